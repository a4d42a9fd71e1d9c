import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { waitsQueue } from '../workflows/options';
import { expectCleanRun } from './support/leaks';
import { startHarness, type Harness } from './support/harness';

/**
 * A batch waits for its runs' outcomes in an activity that lasts as long as the batch. On the
 * rotations' own task queue each such wait held one of the worker's activity slots: as many batches
 * at once as the worker has slots (an agent asking for one rotation per request) held them all, and
 * the rotations they waited for could not run a step for the six hours of the wait's timeout.
 */
describe("batches' waits and the rotations they wait for", () => {
  let h: Harness;
  const SLOTS = 2;

  beforeAll(async () => {
    h = await startHarness({ worker: true, workerActivitySlots: SLOTS });
  });
  afterAll(async () => {
    expect(await expectCleanRun(h)).toEqual({ leaks: [], replay: [] });
    await h.close();
  });

  it('more batches at once than the worker has activity slots all finish: their waits run on a queue of their own', async () => {
    const agent = await h.createIdentity();
    const names = Array.from({ length: SLOTS + 1 }, (_, i) => `one-per-request-${i}`);
    for (const name of names) {
      const stored = await h.api('POST', '/v1/vault.store', {
        token: agent.token,
        body: { name, kind: 'api_key', value: h.secret(`value-of-${name}-0123456789`), rotation: { provider: 'generated', graceHours: 0 } },
      });
      expect(stored.status, stored.text).toBe(201);
    }
    const started = await Promise.all(names.map((name) => h.api('POST', '/v1/rotations', { token: agent.token, body: { credentials: [name] } })));
    for (const s of started) expect(s.status, s.text).toBe(202);

    let timer: NodeJS.Timeout | undefined;
    const stuck = new Promise<'stuck'>((resolve) => (timer = setTimeout(() => resolve('stuck'), 60_000)));
    try {
      const results = await Promise.race([Promise.all(started.map((s) => h.client.workflow.getHandle(s.body.batchWorkflowId).result())), stuck]);
      expect(results).toEqual(names.map(() => ({ total: 1, rotated: 1, failed: 0 })));
    } finally {
      clearTimeout(timer);
    }
    for (const name of names) {
      const read = await h.api('POST', '/v1/vault.get', { token: agent.token, body: { name } });
      expect(read.body.version).toBe(2);
      h.secret(read.body.value);
    }

    // Each wait ran on the waits' queue, not the rotations'.
    for (const s of started) {
      const history = await h.client.workflow.getHandle(s.body.batchWorkflowId).fetchHistory();
      const scheduled = (history.events ?? []).flatMap((e) => (e.activityTaskScheduledEventAttributes ? [e.activityTaskScheduledEventAttributes] : []));
      expect(scheduled.map((a) => [a.activityType?.name, a.taskQueue?.name])).toEqual([
        ['startRotations', h.taskQueue],
        ['awaitOutcomes', waitsQueue(h.taskQueue)],
        ['sendBatchSummaries', h.taskQueue],
      ]);
    }
  }, 120_000);
});
