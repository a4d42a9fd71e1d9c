import type { Request } from 'express';
import { ipKeyGenerator } from 'express-rate-limit';
import { TooManyRequestsError } from '../core/errors';

/**
 * Slows token guessing: each client (IP address; an IPv6 /56) may present at most `maxFailures`
 * invalid bearer tokens per window. Past that, every request from it is answered 429 before its
 * token is looked at, so guesses teach nothing — except tokens that already authenticated from
 * that client in the window, which keep working: valid callers never count, and a misbehaving
 * agent behind the same address does not lock out its neighbours that were already working.
 * Requests without a bearer token are not token checks and do not count.
 *
 * The limit holds for parallel requests too: a client has at most as many lookups of unfamiliar
 * tokens in flight as it has failures left, and its other requests wait for their answers (then
 * pass if the token turned out valid, or are refused once the failures reach the limit). So a burst
 * of guesses gets exactly `maxFailures` looked up, and a burst of valid calls is never refused.
 */
export interface AuthGuardLimits {
  maxFailures: number;
  windowMs: number;
}

/** What the token's lookup found, for `Admission.settle`: `error` when it could not tell (the database is down). */
export type TokenOutcome = 'valid' | 'invalid' | 'error';

export interface Admission {
  /** Call once the token has been looked up: counts a failure, or remembers a token that worked. */
  settle(outcome: TokenOutcome): void;
}

const KNOWN_TOKENS_PER_CLIENT = 64;

interface ClientState {
  /** Requests without a well-formed bearer token in the failure window (they are not guesses). */
  anonymous: number;
  failures: number;
  /** When the failure window ends (it starts at the window's first failure). */
  resetAt: number;
  /** Lookups of unfamiliar tokens in flight. */
  pending: number;
  /** Requests waiting for those lookups' answers. */
  waiting: Array<() => void>;
  /**
   * Tokens (hashes) that authenticated from this client, each until a window after it last did (in
   * the order they last worked). Before, one expiry for them all, moved on by any token that worked:
   * a token that worked once stayed exempt from the throttle as long as another kept working.
   */
  known: Map<string, number>;
  /** When the last of them lapses. */
  knownUntil: number;
}

export class AuthGuard {
  private readonly clients = new Map<string, ClientState>();
  private readonly sweep: NodeJS.Timeout;

  constructor(private readonly limits: AuthGuardLimits) {
    this.sweep = setInterval(() => this.forgetIdle(), limits.windowMs);
    this.sweep.unref();
  }

  /**
   * Admits a request's token check, or throws 429 if the client is over its limit and this token has
   * not worked from it recently. May wait while the client's other lookups run.
   */
  async admit(req: Request, tokenHash: Buffer): Promise<Admission> {
    const client = clientOf(req);
    const token = tokenHash.toString('base64');
    for (;;) {
      const state = this.stateOf(client);
      const now = Date.now();
      if ((state.known.get(token) ?? 0) > now) return this.admission(client, token, false);
      if (state.failures >= this.limits.maxFailures) throw new TooManyRequestsError(Math.max(1, Math.ceil((state.resetAt - now) / 1000)));
      if (state.failures + state.pending < this.limits.maxFailures) {
        state.pending += 1;
        return this.admission(client, token, true);
      }
      await new Promise<void>((resolve) => state.waiting.push(resolve));
    }
  }

  /**
   * Counts a request that presented no well-formed bearer token. It is answered 401 either way (there
   * is nothing to guess); whether its refusal is written to the audit log: the first `maxFailures`
   * from a client per window are, the rest not, as a throttled client's 429s are not, so a flood of
   * anonymous requests does not turn into a flood of audit rows (each takes the chain's lock).
   */
  anonymousAudited(req: Request): boolean {
    const state = this.stateOf(clientOf(req));
    this.startWindow(state);
    state.anonymous += 1;
    return state.anonymous <= this.limits.maxFailures;
  }

  close(): void {
    clearInterval(this.sweep);
    for (const state of this.clients.values()) state.waiting.splice(0).forEach((wake) => wake());
    this.clients.clear();
  }

  private admission(client: string, token: string, pending: boolean): Admission {
    let settled = false;
    return {
      settle: (outcome) => {
        if (settled) return;
        settled = true;
        const state = this.stateOf(client);
        const now = Date.now();
        if (outcome === 'invalid') {
          this.startWindow(state);
          state.failures += 1;
        } else if (outcome === 'valid') {
          if (state.knownUntil <= now) state.known.clear();
          // Full, the one that worked least recently makes room (a Map keeps insertion order; a token
          // that works again moves to the end). Clearing them all forgot every agent behind a shared
          // address (a proxy's) each time a 65th token worked, and one misconfigured agent then
          // locked the forgotten ones out.
          state.known.delete(token);
          if (state.known.size >= KNOWN_TOKENS_PER_CLIENT) state.known.delete(state.known.keys().next().value!);
          state.known.set(token, now + this.limits.windowMs);
          state.knownUntil = now + this.limits.windowMs;
        }
        if (pending) state.pending -= 1;
        state.waiting.splice(0).forEach((wake) => wake());
      },
    };
  }

  /** A client's first counted request (a failure, or one without a token) starts its window. */
  private startWindow(state: ClientState): void {
    if (state.failures === 0 && state.anonymous === 0) state.resetAt = Date.now() + this.limits.windowMs;
  }

  /** The client's state, its failure window restarted if it has run out. */
  private stateOf(client: string): ClientState {
    let state = this.clients.get(client);
    if (!state) {
      state = { anonymous: 0, failures: 0, resetAt: 0, pending: 0, waiting: [], known: new Map(), knownUntil: 0 };
      this.clients.set(client, state);
    }
    if ((state.failures > 0 || state.anonymous > 0) && state.resetAt <= Date.now()) state.failures = state.anonymous = 0;
    return state;
  }

  private forgetIdle(): void {
    const now = Date.now();
    for (const [client, state] of this.clients) {
      if (state.pending === 0 && state.waiting.length === 0 && state.resetAt <= now && state.knownUntil <= now) this.clients.delete(client);
    }
  }
}

function clientOf(req: Request): string {
  return ipKeyGenerator(req.ip ?? req.socket.remoteAddress ?? 'unknown', 56);
}
