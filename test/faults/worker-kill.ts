import { temporal } from '@temporalio/proto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { inject } from 'vitest';
import { scheduleId } from '../../worker/schedules';
import type { StepName } from '../../workflows/types';
import { startHarness, type Harness } from '../support/harness';
import { expectCleanRun } from '../support/leaks';
import type { Identity } from '../support/lifecycle-fixtures';
import { TcpProxy } from '../support/tcp-proxy';
import { startWorkerProcess, type WorkerProcess } from '../support/worker-process';
import { expectSettled, faultRow } from './checks';
import { holdEvent, rotatingKey, until, type RotatingKey } from './fixtures';

/**
 * SIGKILL of the real worker process (`mailgent worker`) at every step of rotateCredential. The
 * step is caught in flight without hooks in the product: its external call is held where it lands
 * (the provider, the webhook consumer, the SMTP connection) or the run is seen in its grace timer.
 * Then the worker dies and a new one takes over; the run must end exactly as without the fault.
 */
const HOLD_MS = 4_000;
const { TimeoutType } = temporal.api.enums.v1;

interface Case {
  step: StepName;
  outcome: 'rotated' | 'failed';
  graceHours?: number;
  maxAttempts?: number;
  /** The http provider's verify.waitSeconds (its default, 30, unless set). */
  verifyWaitSeconds?: number;
  /** Arranges the hold before the rotation starts; resolves once the step is in flight. */
  arrange(key: RotatingKey, h: Harness): () => Promise<unknown>;
}

const providerCall = (route: 'create' | 'whoami' | 'revoke') => (key: RotatingKey) => {
  const seen = key.provider.requests.length;
  key.provider.delayNext(route, 1, HOLD_MS);
  return () => until(`the provider's ${route} request`, () => key.provider.requests.slice(seen).some((r) => r.route === route));
};
const webhookEvent = (type: string) => (key: RotatingKey) => holdEvent(key.receiver!, type, HOLD_MS);

let smtp: TcpProxy;

export const CASES: Case[] = [
  { step: 'create_pending', outcome: 'rotated', arrange: providerCall('create') },
  { step: 'apply_dependents', outcome: 'rotated', arrange: webhookEvent('credential.pending') },
  { step: 'verify', outcome: 'rotated', arrange: providerCall('whoami') },
  {
    step: 'compensate',
    outcome: 'failed',
    maxAttempts: 1,
    // Each of verify's four attempts is one call: the four refusals below are every try.
    verifyWaitSeconds: 0,
    // The provider refuses the new key on every try: the attempt is undone, and the worker dies while the dependent is being restored.
    arrange: (key) => {
      key.provider.failNext('whoami', 4, 403);
      return webhookEvent('credential.restored')(key);
    },
  },
  { step: 'promote', outcome: 'rotated', arrange: webhookEvent('credential.promoted') },
  {
    step: 'notify',
    outcome: 'rotated',
    // The notice's SMTP connection is accepted but gets no answer: the send is in flight.
    arrange: () => {
      const seen = smtp.accepted;
      smtp.hold();
      return () => until('the notice to reach SMTP', () => smtp.accepted > seen);
    },
  },
  {
    step: 'grace',
    outcome: 'rotated',
    graceHours: 0.002, // 7.2 s: the timer fires while no worker runs
    arrange: (key, h) => () =>
      until('the grace period', async () => {
        const handle = h.client.workflow.getHandle(`rotate:${key.id}`);
        const progress = await handle.query<{ state: string }>('progress').catch(() => undefined);
        return progress?.state === 'grace';
      }),
  },
  { step: 'revoke_previous', outcome: 'rotated', arrange: providerCall('revoke') },
];

/** The suite for some of the steps (two files, so vitest runs them side by side). */
export function workerKillSuite(steps: StepName[]): void {
  const cases = CASES.filter((c) => steps.includes(c.step));
  describe('fault: the worker is SIGKILLed mid-rotation', () => {
    let h: Harness;
    let agent: Identity;
    let worker: WorkerProcess;
    const workers: WorkerProcess[] = [];
    const keys: RotatingKey[] = [];
    const start = () => {
      worker = startWorkerProcess(h.workerEnv());
      workers.push(worker);
    };

    beforeAll(async () => {
      smtp = await new TcpProxy({ host: '127.0.0.1', port: Number(new URL(inject('smtpUrl')).port) }).start();
      h = await startHarness({ worker: false, smtpUrl: `smtp://${smtp.address}` });
      agent = await h.createIdentity();
      start();
    });
    afterAll(async () => {
      for (const w of workers) await w.kill();
      for (const id of [scheduleId('rotation-sweep', h.taskQueue), scheduleId('orphan-report', h.taskQueue)]) {
        await h.client.schedule.getHandle(id).delete().catch(() => undefined);
      }
      for (const key of keys) await key.stop();
      await smtp.stop();
      expect(await expectCleanRun(h)).toEqual({ leaks: [], replay: [] });
      await h.close();
    });

    it.for(cases)('SIGKILL during $step: a new worker ends the run ($outcome) as if nothing happened', { timeout: 120_000 }, async (c, { task }) => {
      const row = faultRow(task, `SIGKILL worker during ${c.step}`);
      const key = await rotatingKey(h, agent, { label: `kill-${c.step.replace('_', '-')}`, webhook: true, graceHours: c.graceHours, maxAttempts: c.maxAttempts, verifyWaitSeconds: c.verifyWaitSeconds });
      keys.push(key);
      const inFlight = c.arrange(key, h);
      const workflowId = await key.rotate();
      await inFlight().catch((err) => {
        throw new Error(`${(err as Error).message}\nworker output:\n${worker.output()}`, { cause: err });
      });
      const killedAt = Date.now();
      await worker.kill();
      smtp.release();
      start();

      const { closedAt } = await expectSettled(h, key.expected(workflowId, c.outcome));
      row.outcome = c.outcome === 'rotated' ? 'finished' : 'compensated';
      row['kill → closed'] = `${((closedAt - killedAt) / 1000).toFixed(1)} s`;
      row['provider creates/revokes'] = `${key.provider.creates - key.before.creates}/${key.provider.revokes - key.before.revokes}`;
      if (c.step === 'grace') return; // no activity was in flight: the timer fired
      // The killed attempt was given up for its missing heartbeats (seconds), not its start-to-close
      // timeout (up to minutes): every step's activity heartbeats while it waits. (A notice's did not:
      // its retry came a minute after the kill.)
      const lost = (await h.client.workflow.getHandle(workflowId).fetchHistory()).events!.flatMap((e) => {
        const timeout = e.activityTaskStartedEventAttributes?.lastFailure?.timeoutFailureInfo;
        return timeout ? [TimeoutType[timeout.timeoutType ?? 0]] : [];
      });
      expect(lost).toContain('TIMEOUT_TYPE_HEARTBEAT');
      expect(lost.filter((t) => t !== 'TIMEOUT_TYPE_HEARTBEAT')).toEqual([]);
      row['lost attempt'] = 'heartbeat timeout';
    });
  });
}
