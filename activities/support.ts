import { createHash } from 'node:crypto';
import { ApplicationFailure, Context } from '@temporalio/activity';
import type { Client } from '@temporalio/client';
import { AppError, KeyIntegrityError } from '../core/errors';
import { statusOf } from '../core/run-chain';
import { isDatabaseUnavailable, outlastingOutages } from '../db/pool';
import { markAttemptStart, sleep } from '../core/activity-attempt';

export { sleep };

/** What a run, its report and its notice say of a key that failed (KeyIntegrityError): which one is in the worker's log. */
export const KEY_FAILED = "a key the vault needs failed its integrity check; the worker's log names it";

/** A key's integrity failure, in the worker's log (with the key ids its message names). */
export function logKeyFailure(err: Error): void {
  try {
    Context.current().log.error('a key failed its integrity check', { error: err.message });
  } catch {
    // Not in an activity (a direct call in a test): nothing to log to.
  }
}

/** An error no retry mends (the service's own answer, not "unavailable"), other than a key failure (handled apart: its message names key ids). */
export function isRefusal(err: unknown): err is AppError {
  return err instanceof AppError && err.status !== 503 && !(err instanceof KeyIntegrityError);
}

/** Our own 4xx and integrity errors will not heal by retrying: fail the activity for good. */
export async function permanentErrorsFail<T>(fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (err) {
    if (err instanceof KeyIntegrityError) {
      // Its message names key ids: for the worker's log, not for a run's progress, outcome or notice.
      logKeyFailure(err);
      throw ApplicationFailure.create({ type: err.slug, message: KEY_FAILED, nonRetryable: true });
    }
    if (isRefusal(err)) {
      // The error's fields (ids and versions, never a value: a version conflict's current version)
      // go along as details, for the workflow to act on.
      const details = Object.keys(err.extra).length > 0 ? [err.extra] : undefined;
      throw ApplicationFailure.create({ type: err.slug, message: err.message, nonRetryable: true, details });
    }
    throw err;
  }
}

/**
 * Heartbeats every two seconds while `fn` runs, so a worker that dies mid-call is noticed within
 * the heartbeat timeout instead of the whole start-to-close timeout. Outside an activity (direct
 * calls in tests) it just runs `fn`.
 *
 * A call that ends within two seconds sends none: the heartbeat timeout runs from the activity's
 * start, so a first beat at once told Temporal nothing, yet each one is a write of the workflow's
 * state on the server. One at the start of every step cost rotations ~15% of their throughput
 * (README, "A heartbeat at every step's start").
 */
export async function heartbeating<T>(fn: () => Promise<T>): Promise<T> {
  let ctx: Context | undefined;
  try {
    ctx = Context.current();
  } catch {
    return fn();
  }
  const active = ctx;
  const timer = setInterval(() => active.heartbeat(progressOf.get(active)?.()), 2_000);
  try {
    return await fn();
  } finally {
    clearInterval(timer);
  }
}

/** What each activity's heartbeats carry (reportProgress); a heartbeat without it would erase it. */
const progressOf = new WeakMap<Context, () => unknown>();

/**
 * From now on the calling activity's heartbeats carry `progress()`, and with `now` one is sent at
 * once (the SDK throttles it): a retry of the step reads the last one back (`progressSoFar`) and
 * skips what was done. Outside an activity, nothing.
 */
export function reportProgress(progress: () => unknown, now = false): void {
  let ctx: Context;
  try {
    ctx = Context.current();
  } catch {
    return;
  }
  progressOf.set(ctx, progress);
  if (now) ctx.heartbeat(progress());
}

/** The progress the last attempt of this step reported (undefined on a first attempt, or outside an activity). */
export function progressSoFar<T>(): T | undefined {
  try {
    return (Context.current().info.heartbeatDetails as T | undefined) ?? undefined;
  } catch {
    return undefined;
  }
}

/**
 * How long a step that calls a provider or a dependent waits out a database outage before its
 * attempt fails. It tries the whole step again no later than this, and the try must end within the
 * attempt's start-to-close timeout (externalCall, compensation: checked in test/unit/options.test.ts),
 * or Temporal starts the next attempt beside it. (It was 120 s, as long as the 2-minute timeout
 * itself: an outage of two minutes spent an attempt all the same, and its retry ran beside the
 * attempt still waiting, two provider calls at once.)
 */
export const OUTAGE_WAIT_MS = 5 * 60_000;

/**
 * A database outage is not the provider's fault: a step that calls a provider or a dependent gets
 * only a few attempts, so it waits the outage out (heartbeating, up to `limitMs`) instead of
 * spending them — and the rotation a new key. Safe because every step is idempotent.
 */
export async function outlastingDatabaseOutages<T>(fn: () => Promise<T>, limitMs = OUTAGE_WAIT_MS): Promise<T> {
  const unavailable = (err: unknown) => isDatabaseUnavailable(err) || (err instanceof AppError && err.status === 503);
  return heartbeating(() => outlastingOutages(fn, limitMs, unavailable, sleep));
}

/** A step that calls a provider or a dependent: permanent errors fail it, database outages are waited out. */
export function externalStep<T>(fn: () => Promise<T>): Promise<T> {
  // Its start, which a provider's waits are bounded by (core/activity-attempt.ts).
  markAttemptStart();
  return permanentErrorsFail(() => outlastingDatabaseOutages(fn));
}

/** The run id of the calling workflow, when called as an activity. */
export function callingRunId(): string | undefined {
  try {
    return Context.current().info.workflowExecution?.runId;
  } catch {
    return undefined;
  }
}

/**
 * `at`, a time on the workflow's clock (the Temporal server's), on this worker's: as long before now
 * as it was before this attempt was scheduled (both on the server's clock). A worker clock ahead of
 * the server's would otherwise count that difference as time gone by (a provider's wait for a new
 * key cut short by it). The attempt's time in the queue is not counted: the wait is longer, never
 * shorter. Outside an activity (a test calling one directly), `at` as it is.
 */
export function onWorkerClock(at: string): string {
  let scheduled: number;
  try {
    scheduled = Context.current().info.currentAttemptScheduledTimestampMs;
  } catch {
    return at;
  }
  const before = scheduled - Date.parse(at);
  return Number.isFinite(before) ? new Date(Date.now() - Math.max(0, before)).toISOString() : at;
}

/** A leak incident's email's message id, derived from the incident's, so a later report or the incident's run can find it. */
export function incidentMailId(incidentId: string): string {
  return stableUuid(`${incidentId}:incident-mail`);
}

/** A UUID-shaped id derived from a string, for idempotent inserts. */
export function stableUuid(seed: string): string {
  const h = createHash('sha256').update(seed).digest('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-5${h.slice(13, 16)}-a${h.slice(17, 20)}-${h.slice(20, 32)}`;
}

/** A warning in the activity's log (none outside an activity: a test calling it directly). */
export function warn(message: string, attrs: Record<string, unknown>): void {
  try {
    Context.current().log.warn(message, attrs);
  } catch {
    // Not in an activity.
  }
}

/** Tells Temporal a long activity is alive; a no-op outside an activity (direct calls in tests). */
export function heartbeat(details?: unknown): void {
  try {
    const ctx = Context.current();
    ctx.heartbeat(details ?? progressOf.get(ctx)?.());
  } catch {
    // Not in an activity.
  }
}

/**
 * Whether the workflow run this activity works for has ended (terminated by an operator, say): the
 * activity itself goes on until a heartbeat's answer brings the news, up to 0.8 × its heartbeat
 * timeout later (24 s for a batch's wait). False outside an activity (direct calls in tests) and
 * while Temporal cannot say. (A stop between this answer and what the caller does next is not seen.)
 */
export async function ownRunEnded(client: Client): Promise<boolean> {
  let ctx: Context;
  try {
    ctx = Context.current();
  } catch {
    return false;
  }
  const run = ctx.info.workflowExecution;
  if (!run) return false;
  try {
    // (None found: not a run this server knows, as under a test's mock environment; a run that
    // ended is kept for the namespace's retention, days past any wait of its.)
    const status = await statusOf(client.workflow.getHandle(run.workflowId, run.runId));
    return status !== null && status !== 'RUNNING';
  } catch {
    return false;
  }
}

