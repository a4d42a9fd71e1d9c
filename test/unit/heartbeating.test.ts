import { MockActivityEnvironment } from '@temporalio/testing';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { attemptDelivery } from '../../activities/notices';
import { heartbeating } from '../../activities/support';
import { UNWATCHED_DELIVERY, type DeliveryOptions } from '../../mail/outbox';

/** A mock activity whose heartbeats are counted. */
function activity(): { env: MockActivityEnvironment; beats: () => number } {
  const env = new MockActivityEnvironment();
  let beats = 0;
  env.on('heartbeat', () => (beats += 1));
  return { env, beats: () => beats };
}

describe('heartbeating', () => {
  afterEach(() => {
    vi.useRealTimers();
  });

  it('sends no heartbeat for a call that ends quickly: each one is a write on the Temporal server', async () => {
    const { env, beats } = activity();
    await expect(env.run(() => heartbeating(async () => 'done'))).resolves.toBe('done');
    expect(beats()).toBe(0);
  });

  it('heartbeats every two seconds while a long call runs, and stops when it ends', async () => {
    vi.useFakeTimers();
    const { env, beats } = activity();
    const call = env.run(() => heartbeating(() => new Promise((r) => setTimeout(() => r('slow'), 4_300))));
    await vi.advanceTimersByTimeAsync(1_999);
    expect(beats()).toBe(0);
    await vi.advanceTimersByTimeAsync(2_301);
    await expect(call).resolves.toBe('slow');
    expect(beats()).toBe(2);
    await vi.advanceTimersByTimeAsync(10_000);
    expect(beats()).toBe(2);
  });

  it('runs the call as it is outside an activity', async () => {
    await expect(heartbeating(async () => 42)).resolves.toBe(42);
  });
});

describe('attemptDelivery', () => {
  it('an attempt watched by heartbeats waits for a claim it finds and honours its cancellation; one without (scheduled before noticeDelivery) keeps a claim that outlasts its start-to-close', async () => {
    const watched = new MockActivityEnvironment({ heartbeatTimeoutMs: 10_000 });
    const how = (await watched.run(async () => attemptDelivery())) as DeliveryOptions;
    expect(how).toMatchObject({ waitForClaim: true, lease: { seconds: 15 } });
    expect(how.signal?.aborted).toBe(false);
    watched.cancel();
    expect(how.signal?.aborted).toBe(true);
    const unwatched = new MockActivityEnvironment({ heartbeatTimeoutMs: undefined, startToCloseTimeoutMs: 30_000 });
    const old = (await unwatched.run(async () => attemptDelivery())) as DeliveryOptions;
    expect(old).toEqual(UNWATCHED_DELIVERY);
    expect(old.lease!.seconds * 1000).toBeGreaterThan(30_000);
  });
});
