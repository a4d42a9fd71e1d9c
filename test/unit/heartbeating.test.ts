import { MockActivityEnvironment } from '@temporalio/testing';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { heartbeating } from '../../activities/support';

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
