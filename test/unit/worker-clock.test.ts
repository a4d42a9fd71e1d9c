import { MockActivityEnvironment } from '@temporalio/testing';
import { describe, expect, it } from 'vitest';
import { onWorkerClock } from '../../activities/support';

/** An attempt scheduled when the server's clock read `serverNow` (the worker's clock is Date.now()). */
const attemptOn = (serverNow: number) => new MockActivityEnvironment({ currentAttemptScheduledTimestampMs: serverNow });

describe('onWorkerClock', () => {
  it("moves a workflow time onto the worker's clock: a worker a minute ahead of the server counts 10 s gone by, not 70", async () => {
    const serverNow = Date.now() - 60_000;
    const madeAt = new Date(serverNow - 10_000).toISOString();
    const moved = Date.parse(await attemptOn(serverNow).run(async () => onWorkerClock(madeAt)));
    // Before, madeAt as it was: 70 s behind the worker's clock, most of a provider's wait taken as over.
    expect(Date.now() - moved).toBeGreaterThanOrEqual(10_000);
    expect(Date.now() - moved).toBeLessThan(11_000);
  });

  it('a worker behind the server counts the time since, not less; a time after the attempt was scheduled counts as now', async () => {
    const serverNow = Date.now() + 60_000;
    const moved = Date.parse(await attemptOn(serverNow).run(async () => onWorkerClock(new Date(serverNow - 5_000).toISOString())));
    expect(Date.now() - moved).toBeGreaterThanOrEqual(5_000);
    expect(Date.now() - moved).toBeLessThan(6_000);
    const later = Date.parse(await attemptOn(serverNow).run(async () => onWorkerClock(new Date(serverNow + 5_000).toISOString())));
    expect(Math.abs(Date.now() - later)).toBeLessThan(1_000);
  });

  it('outside an activity, or given no date, passes the time on as it is', async () => {
    expect(onWorkerClock('2026-01-01T00:00:00.000Z')).toBe('2026-01-01T00:00:00.000Z');
    expect(await attemptOn(Date.now()).run(async () => onWorkerClock('not a date'))).toBe('not a date');
  });
});
