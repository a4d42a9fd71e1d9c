import type { ActivityOptions } from '@temporalio/workflow';

/**
 * Activity option presets, one per latency class. Errors our code knows to be permanent are thrown
 * as non-retryable ApplicationFailures by the activities; everything else is retried with backoff.
 */

/** A database step: quick, retried for a while so a PostgreSQL restart does not fail the workflow. */
export const databaseStep: ActivityOptions = {
  startToCloseTimeout: '20s',
  scheduleToCloseTimeout: '15m',
  retry: { initialInterval: '500ms', backoffCoefficient: 2, maximumInterval: '30s' },
};

/**
 * A rotation's database step: retried until PostgreSQL answers, however long it is away. A step that
 * gave up would fail the run half way: after a promote, with the new value live, its outcome
 * unrecorded, no notice sent and the old value never revoked. Refusals (our 4xx) are non-retryable
 * and fail at once; anything else (an outage, or a bug: the attempt's error shows in the Temporal UI
 * until a fixed worker gets through) waits at most a minute between attempts. (A batch's and a
 * sweep's own database steps keep databaseStep's limit: a sweep stuck for good would hold up every
 * scheduled one after it. Their starts and waits, batchStep, retry without one: what stops them is
 * an outage, and a sweep's wait ends at its deadline.)
 */
export const rotationDatabaseStep: ActivityOptions = {
  startToCloseTimeout: '20s',
  retry: { initialInterval: '500ms', backoffCoefficient: 2, maximumInterval: '1m' },
};

/**
 * A call to a provider or a dependent: heartbeats while it waits, so a dead worker is noticed in
 * seconds; a few attempts, so a broken provider fails the step visibly instead of looping. Its
 * start-to-close bounds a live attempt only (a dead one is noticed by its heartbeat): it must hold
 * a database outage waited out (OUTAGE_WAIT_MS) and then the whole step tried once more, two calls
 * to a provider at its longest timeout in a discard's case. At 2 minutes it held neither: an HTTP
 * provider at its 120 s timeout never finished a discard, and a retry ran beside an attempt still
 * waiting for the database.
 */
export const externalCall: ActivityOptions = {
  startToCloseTimeout: '10m',
  heartbeatTimeout: '10s',
  retry: { initialInterval: '1s', backoffCoefficient: 2, maximumInterval: '30s', maximumAttempts: 4 },
};

/** Compensation must get through: more patience than the step it undoes. */
export const compensation: ActivityOptions = {
  startToCloseTimeout: '10m',
  heartbeatTimeout: '10s',
  scheduleToCloseTimeout: '1h',
  retry: { initialInterval: '2s', backoffCoefficient: 2, maximumInterval: '2m' },
};

/**
 * The activities that hand many notices over in one attempt (a sweep's summaries and reminders, the
 * orphan report: each queued and given a deliverMail workflow of its own, which sends it under
 * noticeDelivery): retried for a day, with backoff capped at five minutes. An attempt heartbeats,
 * so one lost with its worker is retried within 30 s; its start-to-close is long, because one
 * summary's check for stored values grows with the credentials it lists (thousands for a team's
 * address), and an attempt cut short would be retried from the same check while it still ran.
 */
export const emailDelivery: ActivityOptions = {
  startToCloseTimeout: '10m',
  heartbeatTimeout: '30s',
  scheduleToCloseTimeout: '24h',
  retry: { initialInterval: '2s', backoffCoefficient: 2, maximumInterval: '5m' },
};

/**
 * One message's delivery (a rotation's notice, a deliverMail workflow's message): emailDelivery's
 * day of retries, but the attempt heartbeats while it talks to the server, so an attempt lost with a
 * dead worker is retried within the 10 s heartbeat timeout, not after the start-to-close. That only
 * bounds a live attempt, and must outlast the longest one: a dead attempt's claim waited for (15 s),
 * a slow relay's exchanges (the mailer's timeouts are per exchange), and a minute's wait for the
 * database to mark the message sent; a retry while it lives could send the message again
 * (mail/outbox.ts, WATCHED_DELIVERY).
 */
export const noticeDelivery: ActivityOptions = {
  ...emailDelivery,
  startToCloseTimeout: '5m',
  heartbeatTimeout: '10s',
};

/**
 * The task queue a batch's and a sweep's wait for its runs' outcomes goes to (see BATCH_WAITS_APART):
 * the worker polls it beside the rotations' own, with slots of its own.
 */
export function waitsQueue(taskQueue: string): string {
  return `${taskQueue}-batch-waits`;
}

/** Starting or watching a batch of rotations: long, heartbeating, resumable. */
export const batchStep: ActivityOptions = {
  startToCloseTimeout: '6h',
  heartbeatTimeout: '30s',
  retry: { initialInterval: '2s', backoffCoefficient: 2, maximumInterval: '1m' },
};
