import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { scheduleId } from '../../worker/schedules';
import { startHarness, type Harness } from '../support/harness';
import { expectCleanRun } from '../support/leaks';
import type { Identity } from '../support/lifecycle-fixtures';
import { startWorkerProcess, type WorkerProcess } from '../support/worker-process';
import { expectSettled, faultRow } from './checks';
import { holdEvent, rotatingKey, type RotatingKey } from './fixtures';

/**
 * SIGTERM (a deploy, `docker compose stop`) while an activity is in flight: the worker stops
 * polling, lets the running activity finish within SHUTDOWN_GRACE_SECONDS, reports it, and exits 0.
 * The activity is not run a second time; a new worker carries the rotation on from the next step.
 */
describe('fault: the worker is stopped gracefully mid-rotation', () => {
  let h: Harness;
  let agent: Identity;
  const workers: WorkerProcess[] = [];
  let key: RotatingKey | undefined;
  const start = () => {
    const w = startWorkerProcess({ ...h.workerEnv(), SHUTDOWN_GRACE_SECONDS: '8' });
    workers.push(w);
    return w;
  };

  beforeAll(async () => {
    h = await startHarness({ worker: false });
    agent = await h.createIdentity();
  });
  afterAll(async () => {
    for (const w of workers) await w.kill();
    for (const id of [scheduleId('rotation-sweep', h.taskQueue), scheduleId('orphan-report', h.taskQueue)]) {
      await h.client.schedule.getHandle(id).delete().catch(() => undefined);
    }
    await key?.stop();
    expect(await expectCleanRun(h)).toEqual({ leaks: [], replay: [] });
    await h.close();
  });

  it('SIGTERM during apply_dependents: the call in flight finishes once, the worker exits 0, a new worker finishes the run', { timeout: 150_000 }, async ({ task }) => {
    const row = faultRow(task, 'SIGTERM worker during apply_dependents (graceful drain)');
    const worker = start();
    key = await rotatingKey(h, agent, { label: 'drain', webhook: true });
    const inFlight = holdEvent(key.receiver!, 'credential.pending', 4_000);
    const workflowId = await key.rotate();
    await inFlight();

    const termAt = Date.now();
    worker.proc.kill('SIGTERM');
    const code = await worker.exited;
    const exitedAfter = Date.now() - termAt;
    expect(code, worker.output()).toBe(0);
    // It waited for the held call (4 s) instead of abandoning it, and ended within the grace period
    // plus the SDK's force time (serve.ts: grace + 10 s). The SDK holds the process until the grace
    // period ends even once the activity is done (its task pollers close then), so ~8 s here.
    expect(exitedAfter).toBeGreaterThan(2_500);
    expect(exitedAfter).toBeLessThan(20_000);

    start();
    const { closedAt } = await expectSettled(h, key.expected(workflowId, 'rotated'));
    // The drained call completed, so the step was not run again.
    expect(key.receiver!.events.filter((e) => e.event.type === 'credential.pending')).toHaveLength(1);
    row.outcome = 'finished';
    row['SIGTERM → exit 0'] = `${(exitedAfter / 1000).toFixed(1)} s`;
    row['SIGTERM → closed'] = `${((closedAt - termAt) / 1000).toFixed(1)} s`;
    row['provider creates/revokes'] = `${key.provider.creates - key.before.creates}/${key.provider.revokes - key.before.revokes}`;
  });
});
