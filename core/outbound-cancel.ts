import { Context } from '@temporalio/activity';

// Apart from core/outbound.ts, which the CLI loads through core/config.ts: only the outbound calls
// made in activities (providers/http, dependents/webhook) need Temporal's activity package.

/**
 * The signal of one outbound call: its timeout and, when it runs in a Temporal activity, the
 * activity's cancellation (a cancelled rotation, a worker draining), so a call that hangs does not
 * hold up the undo that follows it. (The rotation waits for the cancelled call to end before it
 * undoes anything: workflows/options.ts.)
 */
export function outboundSignal(timeoutMs: number): AbortSignal {
  const timeout = AbortSignal.timeout(timeoutMs);
  const cancelled = activityCancellation();
  return cancelled ? AbortSignal.any([timeout, cancelled]) : timeout;
}

/**
 * The activity's cancellation (Temporal's CancelledFailure) when that is what ended a call: thrown
 * as is, the activity is reported cancelled rather than failed. Undefined otherwise.
 */
export function cancellationOf(): unknown {
  const signal = activityCancellation();
  return signal?.aborted ? (signal.reason ?? new Error('the call was cancelled')) : undefined;
}

function activityCancellation(): AbortSignal | undefined {
  try {
    return Context.current().cancellationSignal;
  } catch {
    return undefined; // not in an activity
  }
}
