import { Context } from '@temporalio/activity';

// The timing of the activity calling: its waits, and how long its attempt may still last. No
// database code: providers (loaded by the API too) and activities/support.ts use it.

/**
 * Sleeps, but as an activity it wakes up (rejects with the activity's CancelledFailure) when the
 * activity is cancelled or the worker shuts down; outside an activity (a direct call in a test) a
 * plain timer.
 */
export async function sleep(ms: number): Promise<void> {
  let ctx: Context;
  try {
    ctx = Context.current();
  } catch {
    return new Promise((resolve) => setTimeout(resolve, ms));
  }
  await ctx.sleep(ms);
}

/** When each activity attempt started, by this worker's clock (markAttemptStart). */
const attemptStarts = new WeakMap<Context, number>();

/**
 * Records that the calling activity's attempt starts now (the first call counts; none outside an
 * activity). A rotation's external steps call it first thing (activities/support.ts, externalStep):
 * the start-to-close timeout runs from the attempt's start, which Temporal's activity info does not
 * give (only when it was scheduled: an attempt queued behind busy slots starts minutes later).
 */
export function markAttemptStart(): void {
  try {
    const ctx = Context.current();
    if (!attemptStarts.has(ctx)) attemptStarts.set(ctx, Date.now());
  } catch {
    // Not in an activity.
  }
}

/**
 * The latest time (ms since the epoch) a wait of the calling activity may last to, leaving
 * `reserveMs` of its attempt's start-to-close timeout for what must still follow it (one more
 * call, a margin). An attempt that waited past it would be timed out by Temporal and tried again
 * beside itself. Counted from the attempt's start (markAttemptStart), by this worker's clock; from
 * when it was scheduled if unmarked. Infinity outside an activity.
 */
export function attemptWaitLimit(reserveMs: number): number {
  let ctx: Context;
  try {
    ctx = Context.current();
  } catch {
    return Infinity;
  }
  const { currentAttemptScheduledTimestampMs: scheduled, startToCloseTimeoutMs: limit } = ctx.info;
  const started = attemptStarts.get(ctx) ?? scheduled;
  return started > 0 && limit > 0 ? started + limit - reserveMs : Infinity;
}
