import { describe, expect, it } from 'vitest';
import { UnprocessableError } from '../../core/errors';
import { statusError } from '../../providers/http/request';

/** A provider's non-2xx answer becomes an error of its status and status text, with the secrets in play cut out. */
describe('statusError', () => {
  const secret = 'sk_live_0123456789abcdefghijklmnopqrstuv';

  it('cuts a secret out before shortening the text: no head of it is left where it crossed the 80th character', () => {
    const res = new Response(null, { status: 401, statusText: `${'x'.repeat(60)} ${secret}` });
    const err = statusError('the verify call', res, [secret]);
    expect(err).toBeInstanceOf(UnprocessableError);
    // Before, the text was shortened first: the key's first 19 characters were left in the message.
    expect(err.message).not.toContain(secret.slice(0, 8));
    expect(err.message).toBe(`the verify call answered 401 ${'x'.repeat(60)} [redacted]`);
  });

  it('keeps at most 80 characters of the text, and a 5xx stays retryable', () => {
    const err = statusError('the create call', new Response(null, { status: 503, statusText: 'y'.repeat(200) }), [secret]);
    expect(err).not.toBeInstanceOf(UnprocessableError);
    expect(err.message).toBe(`the create call answered 503 ${'y'.repeat(80)}`);
  });
});
