import { Worker, bundleWorkflowCode } from '@temporalio/worker';
import { DeterminismViolationError } from '@temporalio/workflow';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FAILURE_CONVERTER_PATH } from '../vault/payload-codec';
import { expectCleanRun, replayFailures } from './support/leaks';
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
    for (let i = 0; i < 100; i++) {
      const r = await h.api('GET', `/v1/rotations/${started.body.rotationId}`, { token: agent.token });
      if (r.body.state === 'succeeded') break;
      await new Promise((res) => setTimeout(res, 200));
    }
    h.secret((await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name: 'k' } })).body.value);
    expect(await replayFailures(h)).toEqual([]);

    const history = await h.client.workflow.getHandle(id).fetchHistory();
    const changed = await bundleWorkflowCode({
      workflowsPath: path.resolve(import.meta.dirname, 'fixtures/changed-workflows.ts'),
      failureConverterPath: FAILURE_CONVERTER_PATH,
      logger: { log() {}, trace() {}, debug() {}, info() {}, warn() {}, error() {} },
    });
    await expect(Worker.runReplayHistory({ workflowBundle: changed, dataConverter: h.services.dataConverter }, history, id)).rejects.toBeInstanceOf(DeterminismViolationError);
  });
});
