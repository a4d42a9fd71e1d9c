import type { ActivityOptions } from '@temporalio/workflow';

/**
 * Activity option presets, one per latency class. Errors our code knows to be permanent are thrown
 * as non-retryable ApplicationFailures by the activities; everything else is retried with backoff.
 */

/** A database step: quick, retried for a few minutes so a PostgreSQL restart does not fail a rotation. */
export const databaseStep: ActivityOptions = {
  startToCloseTimeout: '20s',
  scheduleToCloseTimeout: '10m',
  retry: { initialInterval: '500ms', backoffCoefficient: 2, maximumInterval: '30s' },
};

/** A call to a credential provider: slower, fewer attempts so a broken provider fails visibly. */
export const providerCall: ActivityOptions = {
  startToCloseTimeout: '1m',
  retry: { initialInterval: '2s', backoffCoefficient: 2, maximumInterval: '1m', maximumAttempts: 5 },
};

/** An email: SMTP outages are waited out for a day, with backoff capped at five minutes. */
export const emailDelivery: ActivityOptions = {
  startToCloseTimeout: '1m',
  scheduleToCloseTimeout: '24h',
  retry: { initialInterval: '2s', backoffCoefficient: 2, maximumInterval: '5m' },
};
