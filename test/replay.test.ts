import { Worker, bundleWorkflowCode } from '@temporalio/worker';
import { temporal } from '@temporalio/proto';
import { DeterminismViolationError } from '@temporalio/workflow';
import path from 'node:path';
import { readdirSync, readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { FAILURE_CONVERTER_PATH } from '../vault/payload-codec';
import { expectCleanRun, loadHistory, replayFailures, replayable } from './support/leaks';
import { startHarness, type Harness } from './support/harness';

/** The replay check that every test file ends with can fail: a changed workflow is caught. */
describe('replaying recorded histories', () => {
  let h: Harness;
  beforeAll(async () => {
    h = await startHarness({ worker: true });
  });
  afterAll(async () => {
    expect(await expectCleanRun(h)).toEqual({ leaks: [], replay: [] });
    await h.close();
  });

  it('passes against the current code and reports non-determinism against changed code', async () => {
    const agent = await h.createIdentity();
    await h.api('POST', '/v1/vault.store', { token: agent.token, body: { name: 'k', kind: 'api_key', value: h.secret('replay-value-0001'), rotation: { provider: 'generated', graceHours: 0 } } });
    const started = await h.api('POST', '/v1/rotations', { token: agent.token, body: { credentials: ['k'] } });
    const id = started.body.workflowIds[0];
    let state: string | undefined;
    for (let i = 0; i < 100 && state !== 'succeeded'; i++) {
      if (i > 0) await new Promise((res) => setTimeout(res, 200));
      state = (await h.api('GET', `/v1/rotations/${started.body.rotationId}`, { token: agent.token })).body.state;
    }
    // A rotation stuck or failed has a history of another shape: replaying it would check less.
    expect(state).toBe('succeeded');
    h.secret((await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name: 'k' } })).body.value);
    expect(await replayFailures(h)).toEqual([]);

    const history = await h.client.workflow.getHandle(id).fetchHistory();
    await expect(Worker.runReplayHistory({ workflowBundle: await changed(), dataConverter: h.services.dataConverter }, history, id)).rejects.toBeInstanceOf(
      DeterminismViolationError,
    );
  });

  it('a run that has not completed a workflow task has nothing to replay and is skipped, not waited for forever', async () => {
    // A start delay leaves the history at WorkflowExecutionStarted alone, as a run just continued
    // as new can be for a moment: the shape SDK 1.24's replayer never finishes.
    const handle = await h.client.workflow.start('deliverMail', {
      taskQueue: h.taskQueue,
      workflowId: `replay-delayed-${Date.now()}`,
      args: [{ messageId: '00000000-0000-0000-0000-000000000000' }],
      startDelay: '1h',
    });
    try {
      const history = await handle.fetchHistory();
      expect(history.events!.map((e) => e.eventType)).toEqual([temporal.api.enums.v1.EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED]);
      expect(replayable(history)).toBe(false);
      expect(await replayFailures(h)).toEqual([]);
    } finally {
      await handle.terminate('the test is done with it');
    }
  });

  /**
   * Histories recorded from the suite by earlier versions of the code (decoded; ids and versions
   * only): a change that would break workflows already running in production fails here. Refresh
   * with MAILGENT_RECORD_HISTORIES=<dir> npx vitest run <files> when a change is deliberate
   * (and versioned with patched()).
   */
  it('histories recorded by earlier versions of the code replay against the current workflows', async () => {
    const dir = path.resolve(import.meta.dirname, 'fixtures/histories');
    const recorded = readdirSync(dir)
      .filter((f) => f.endsWith('.json'))
      .map((f) => ({ workflowId: f, history: loadHistory(readFileSync(path.join(dir, f), 'utf8')) }));
    const types = new Set(recorded.map((r) => r.history.events?.[0]?.workflowExecutionStartedEventAttributes?.workflowType?.name));
    expect([...types].sort()).toEqual(['deliverMail', 'orphanReport', 'rotateBatch', 'rotateCredential', 'rotationSweep']);

    const replay = async (workflowBundle: { codePath: string } | { code: string }) => {
      const failed: string[] = [];
      for await (const result of Worker.runReplayHistories({ workflowBundle }, recorded)) if (result.error) failed.push(result.workflowId);
      return failed;
    };
    expect(await replay({ codePath: inject('workflowBundlePath') })).toEqual([]);
    // The same check can fail: the changed workflows break every recorded rotation.
    const broken = await replay(await changed());
    expect(broken.filter((f) => f.startsWith('rotateCredential-')).length).toBe(recorded.filter((r) => r.workflowId.startsWith('rotateCredential-')).length);
  });
});

let changedBundle: ReturnType<typeof bundleWorkflowCode> | undefined;
/** The workflows with one activity call changed: what a careless edit does to running histories. */
function changed() {
  changedBundle ??= bundleWorkflowCode({
    workflowsPath: path.resolve(import.meta.dirname, 'fixtures/changed-workflows.ts'),
    failureConverterPath: FAILURE_CONVERTER_PATH,
    logger: { log() {}, trace() {}, debug() {}, info() {}, warn() {}, error() {} },
  });
  return changedBundle;
}
