import type { Request } from 'express';
import { describe, expect, it, vi } from 'vitest';
import { AuthGuard, type TokenOutcome } from '../../api/auth-guard';
import { depthExceeds } from '../../api/endpoint';
import { toAppError } from '../../api/problem';
import { AuditUnavailableError, TooManyRequestsError } from '../../core/errors';
import { hashToken, newToken, tokensEqual } from '../../vault/identities';

describe('token comparison', () => {
  it('compares fixed-length hashes, so tokens of any length compare without throwing', () => {
    const token = newToken();
    expect(tokensEqual(token, hashToken(token))).toBe(true);
    expect(tokensEqual(token.slice(0, -1), hashToken(token))).toBe(false);
    expect(tokensEqual('', hashToken(token))).toBe(false);
    expect(tokensEqual('x'.repeat(10_000), hashToken(token))).toBe(false);
    expect(hashToken('a').length).toBe(hashToken('a'.repeat(512)).length);
  });
});

describe('auth guard', () => {
  const from = (ip: string) => ({ ip, socket: {} }) as unknown as Request;

  /** One token check through the guard: admitted, then settled with `outcome`. */
  const attempt = async (guard: AuthGuard, ip: string, token: Buffer, outcome: TokenOutcome) => (await guard.admit(from(ip), token)).settle(outcome);

  it('throttles a client after its limit of invalid tokens, except tokens that worked from it', async () => {
    const guard = new AuthGuard({ maxFailures: 3, windowMs: 60_000 });
    const good = hashToken('good');
    await attempt(guard, '10.0.0.1', good, 'valid');
    for (let i = 0; i < 3; i++) await attempt(guard, '10.0.0.1', hashToken(`guess-${i}`), 'invalid');
    const refused = await guard.admit(from('10.0.0.1'), hashToken('guess-4')).catch((e) => e);
    expect(refused).toBeInstanceOf(TooManyRequestsError);
    expect(refused.retryAfterSeconds).toBeGreaterThan(0);
    expect(refused.retryAfterSeconds).toBeLessThanOrEqual(60);
    await expect(guard.admit(from('10.0.0.1'), good)).resolves.toBeDefined();
    await expect(guard.admit(from('10.0.0.2'), hashToken('guess-5'))).resolves.toBeDefined();
    guard.close();
  });

  it('remembers the 64 tokens that worked most recently from a client, not none once a 65th works (many agents behind one proxy)', async () => {
    const guard = new AuthGuard({ maxFailures: 1, windowMs: 60_000 });
    const tokens = Array.from({ length: 70 }, (_, i) => hashToken(`agent-${i}`));
    for (const token of tokens) await attempt(guard, '10.0.0.9', token, 'valid');
    await attempt(guard, '10.0.0.9', hashToken('misconfigured'), 'invalid');
    // Before, the 65th cleared them all: only the last six were still known, and the rest got 429s.
    for (const token of tokens.slice(6)) await expect(guard.admit(from('10.0.0.9'), token)).resolves.toBeDefined();
    for (const token of tokens.slice(0, 6)) await expect(guard.admit(from('10.0.0.9'), token)).rejects.toBeInstanceOf(TooManyRequestsError);
    guard.close();
  });

  it('a token stays exempt a window after it last worked, not while other tokens keep working from the client', async () => {
    vi.useFakeTimers({ toFake: ['Date'] });
    try {
      const guard = new AuthGuard({ maxFailures: 1, windowMs: 60_000 });
      const once = hashToken('worked-once');
      const neighbour = hashToken('neighbour');
      await attempt(guard, '10.0.0.7', once, 'valid');
      for (let minute = 1; minute <= 3; minute++) {
        vi.setSystemTime(Date.now() + 40_000);
        await attempt(guard, '10.0.0.7', neighbour, 'valid');
      }
      await attempt(guard, '10.0.0.7', hashToken('guess'), 'invalid');
      // Before, the neighbour's successes kept every token known: the one that worked two minutes ago got through the throttle.
      await expect(guard.admit(from('10.0.0.7'), once)).rejects.toBeInstanceOf(TooManyRequestsError);
      await expect(guard.admit(from('10.0.0.7'), neighbour)).resolves.toBeDefined();
      guard.close();
    } finally {
      vi.useRealTimers();
    }
  });

  it('counts an IPv6 /56 as one client', async () => {
    const guard = new AuthGuard({ maxFailures: 1, windowMs: 60_000 });
    await attempt(guard, '2001:db8:0:1::1', hashToken('guess'), 'invalid');
    await expect(guard.admit(from('2001:db8:0:2::9'), hashToken('x'))).rejects.toBeInstanceOf(TooManyRequestsError);
    await expect(guard.admit(from('2001:db8:1:100::1'), hashToken('x'))).resolves.toBeDefined();
    guard.close();
  });

  it('admits no more lookups at once than failures are left; the others wait for their answers', async () => {
    const guard = new AuthGuard({ maxFailures: 2, windowMs: 60_000 });
    const first = await guard.admit(from('10.0.0.3'), hashToken('a'));
    const second = await guard.admit(from('10.0.0.3'), hashToken('b'));
    let thirdDone = false;
    const third = guard.admit(from('10.0.0.3'), hashToken('c')).then(
      (admission) => ((thirdDone = true), admission),
      (err: unknown) => ((thirdDone = true), Promise.reject(err)),
    );
    await new Promise((r) => setTimeout(r, 20));
    expect(thirdDone).toBe(false);
    // A lookup that could not tell (the database was down) is no failure: the waiting one takes its place.
    first.settle('error');
    const admitted = await third;
    second.settle('invalid');
    admitted.settle('invalid');
    await expect(guard.admit(from('10.0.0.3'), hashToken('d'))).rejects.toBeInstanceOf(TooManyRequestsError);
    guard.close();
  });

  it('an admission settled twice counts once', async () => {
    const guard = new AuthGuard({ maxFailures: 2, windowMs: 60_000 });
    const once = await guard.admit(from('10.0.0.6'), hashToken('a'));
    once.settle('invalid');
    once.settle('invalid');
    // One failure of two: one more guess is still looked up.
    const next = await guard.admit(from('10.0.0.6'), hashToken('b'));
    next.settle('invalid');
    await expect(guard.admit(from('10.0.0.6'), hashToken('c'))).rejects.toBeInstanceOf(TooManyRequestsError);
    guard.close();
  });

  it('requests that wait behind a lookup that finds the token valid pass as that token', async () => {
    const guard = new AuthGuard({ maxFailures: 1, windowMs: 60_000 });
    const token = hashToken('valid-token');
    const first = await guard.admit(from('10.0.0.4'), token);
    const waiting = Promise.all([guard.admit(from('10.0.0.4'), token), guard.admit(from('10.0.0.4'), token)]);
    first.settle('valid');
    const admitted = await waiting;
    admitted.forEach((a) => a.settle('valid'));
    // No failure was counted: a guess is still looked up.
    await expect(guard.admit(from('10.0.0.4'), hashToken('guess'))).resolves.toBeDefined();
    guard.close();
  });

  it('the failure window restarts once it has run out', async () => {
    const guard = new AuthGuard({ maxFailures: 1, windowMs: 50 });
    await attempt(guard, '10.0.0.5', hashToken('guess-1'), 'invalid');
    await expect(guard.admit(from('10.0.0.5'), hashToken('guess-2'))).rejects.toBeInstanceOf(TooManyRequestsError);
    await new Promise((r) => setTimeout(r, 80));
    await expect(guard.admit(from('10.0.0.5'), hashToken('guess-3'))).resolves.toBeDefined();
    guard.close();
  });
});

describe('error mapping', () => {
  it('a lost or refused database connection is a 503, not a 500', () => {
    for (const err of [
      Object.assign(new Error('terminating connection due to administrator command'), { code: '57P01' }),
      Object.assign(new Error('connect ECONNREFUSED 127.0.0.1:5432'), { code: 'ECONNREFUSED' }),
      Object.assign(new Error('read ECONNRESET'), { code: 'ECONNRESET' }),
      new Error('Connection terminated unexpectedly'),
      new Error('Client has encountered a connection error and is not queryable'),
      new Error('timeout exceeded when trying to connect'),
      Object.assign(new Error('sorry, too many clients already'), { code: '53300' }),
    ]) {
      expect(toAppError(err)).toMatchObject({ status: 503, slug: 'unavailable' });
    }
    expect(toAppError(new AuditUnavailableError())).toMatchObject({ status: 503, slug: 'audit-unavailable' });
    expect(toAppError(Object.assign(new Error('duplicate key'), { code: '23505' }))).toMatchObject({ status: 500, slug: 'internal' });
    expect(toAppError(new TypeError('x is undefined')).message).not.toContain('undefined');
  });
});

describe('JSON depth', () => {
  it('measures depth without recursion', () => {
    let deep: unknown = 1;
    for (let i = 0; i < 200_000; i++) deep = [deep];
    expect(depthExceeds(deep, 32)).toBe(true);
    expect(depthExceeds({ a: { b: [1, { c: 2 }] } }, 4)).toBe(false);
    expect(depthExceeds({ a: { b: [1, { c: {} }] } }, 4)).toBe(true);
    expect(depthExceeds('text', 0)).toBe(false);
  });
});
