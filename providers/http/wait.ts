import { Context } from '@temporalio/activity';

/**
 * Waits `ms`. In an activity the wait ends early when the activity is cancelled (a cancelled
 * rotation, a worker shutting down): it rejects with the activity's CancelledFailure, so the step
 * is reported cancelled. Outside an activity (a direct call in a test) it is a plain timer.
 */
export async function pause(ms: number): Promise<void> {
  let ctx: Context;
  try {
    ctx = Context.current();
  } catch {
    return new Promise((resolve) => setTimeout(resolve, ms));
  }
  await ctx.sleep(ms);
}

/**
 * The latest time (ms since the epoch) a wait of the calling activity may last to, leaving
 * `reserveMs` of its attempt's start-to-close timeout for what must still follow it (one more
 * call, the step's database work). An attempt that waited past it would be timed out by Temporal
 * and tried again beside itself. Counted from when the attempt was scheduled, a little before it
 * started. Infinity outside an activity.
 */
export function attemptWaitLimit(reserveMs: number): number {
  let info: Context['info'];
  try {
    info = Context.current().info;
  } catch {
    return Infinity;
  }
  const { currentAttemptScheduledTimestampMs: scheduled, startToCloseTimeoutMs: limit } = info;
  return scheduled > 0 && limit > 0 ? scheduled + limit - reserveMs : Infinity;
}
