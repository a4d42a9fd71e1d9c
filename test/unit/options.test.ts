import { msToNumber } from '@temporalio/common/lib/time';
import { describe, expect, it } from 'vitest';
import { OUTAGE_WAIT_MS } from '../../activities/support';
import { MAX_TIMEOUT_MS as WEBHOOK_MAX_MS } from '../../dependents/webhook/schema';
import { MAX_TIMEOUT_MS as PROVIDER_MAX_MS } from '../../providers/http/schema';
import { compensation, externalCall } from '../../workflows/options';

/**
 * A step that calls a provider or a dependent waits a database outage out for up to OUTAGE_WAIT_MS,
 * then tries the whole step once more; that try must end inside the attempt's start-to-close timeout,
 * or Temporal starts the next attempt beside it (two provider calls at once), and a step that cannot
 * fit in it at all (a discard: a create and a revoke, each at its provider's longest timeout) never
 * finishes. Both timeouts were 2 minutes, and the outage wait 120 s.
 */
describe('the steps that call providers and dependents', () => {
  // The database work around the calls: a few statements, each under the pool's 15 s statement timeout.
  const DATABASE_MS = 30_000;
  const longestTry = Math.max(2 * PROVIDER_MAX_MS, 2 * WEBHOOK_MAX_MS) + DATABASE_MS;

  it.each([
    ['externalCall', externalCall],
    ['compensation', compensation],
  ])('%s: an attempt holds an outage waited out and one more try of its longest step', (_name, options) => {
    const startToClose = msToNumber(options.startToCloseTimeout!);
    expect(startToClose - OUTAGE_WAIT_MS).toBeGreaterThanOrEqual(longestTry);
    // A dead worker is still noticed by the heartbeat, in seconds, not by this timeout.
    expect(msToNumber(options.heartbeatTimeout!)).toBeLessThanOrEqual(10_000);
  });
});
