import { describe, expect, it } from 'vitest';
import { neverReached } from '../../activities/batch';

/** A batch's start that failed is taken for unsent (its row may then be dropped) only when no connection was made. */
describe('neverReached', () => {
  const failed = (message: string, code = 14) => Object.assign(new Error('Failed to start Workflow'), { cause: Object.assign(new Error(message), { code }) });

  it('a start with no connection to the server (what the client throws with the server down) never reached it', () => {
    // As @temporalio/client 1.24 reports a start against a closed port.
    expect(neverReached(failed('14 UNAVAILABLE: No connection established. Last error: Error: connect ECONNREFUSED 127.0.0.1:1. Resolution note: '))).toBe(true);
  });

  it('a connection dropped or reset mid-call may have carried the start: not taken for unsent', () => {
    // Before, every UNAVAILABLE was: the retry could drop the row of a run the server had started.
    expect(neverReached(failed('14 UNAVAILABLE: Connection dropped'))).toBe(false);
    expect(neverReached(failed('14 UNAVAILABLE: read ECONNRESET'))).toBe(false);
    expect(neverReached(failed('4 DEADLINE_EXCEEDED: Deadline exceeded', 4))).toBe(false);
    expect(neverReached(new Error('workflow start refused'))).toBe(false);
  });
});
