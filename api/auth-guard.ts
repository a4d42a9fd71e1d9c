import type { Request } from 'express';
import { ipKeyGenerator, MemoryStore, type Options } from 'express-rate-limit';
import { TooManyRequestsError } from '../core/errors';

/**
 * Slows token guessing: each client (IP address; an IPv6 /56) may present at most `maxFailures`
 * invalid bearer tokens per window. Past that, every request from it is answered 429 before its
 * token is looked at, so guesses teach nothing — except tokens that already authenticated from
 * that client in the window, which keep working: valid callers never count, and a misbehaving
 * agent behind the same address does not lock out its neighbours that were already working.
 * Requests without a bearer token are not token checks and do not count.
 */
export interface AuthGuardLimits {
  maxFailures: number;
  windowMs: number;
}

const KNOWN_TOKENS_PER_CLIENT = 64;

export class AuthGuard {
  private readonly failures = new MemoryStore();
  private readonly known = new Map<string, { hashes: Set<string>; expires: number }>();
  private readonly sweep: NodeJS.Timeout;

  constructor(private readonly limits: AuthGuardLimits) {
    this.failures.init({ windowMs: limits.windowMs } as Options);
    this.sweep = setInterval(() => this.forgetExpired(), limits.windowMs);
    this.sweep.unref();
  }

  /** Throws 429 if the client is over its limit and this token has not worked from it recently. */
  async check(req: Request, tokenHash: Buffer): Promise<void> {
    const client = clientOf(req);
    const info = await this.failures.get(client);
    if (!info || info.totalHits < this.limits.maxFailures) return;
    const known = this.known.get(client);
    if (known && known.expires > Date.now() && known.hashes.has(tokenHash.toString('base64'))) return;
    const resetMs = (info.resetTime?.getTime() ?? Date.now() + this.limits.windowMs) - Date.now();
    throw new TooManyRequestsError(Math.max(1, Math.ceil(resetMs / 1000)));
  }

  async failed(req: Request): Promise<void> {
    await this.failures.increment(clientOf(req));
  }

  succeeded(req: Request, tokenHash: Buffer): void {
    const client = clientOf(req);
    let entry = this.known.get(client);
    if (!entry || entry.expires <= Date.now()) {
      entry = { hashes: new Set(), expires: 0 };
      this.known.set(client, entry);
    }
    if (entry.hashes.size >= KNOWN_TOKENS_PER_CLIENT) entry.hashes.clear();
    entry.hashes.add(tokenHash.toString('base64'));
    entry.expires = Date.now() + this.limits.windowMs;
  }

  close(): void {
    clearInterval(this.sweep);
    this.failures.shutdown();
  }

  private forgetExpired(): void {
    const now = Date.now();
    for (const [client, entry] of this.known) if (entry.expires <= now) this.known.delete(client);
  }
}

function clientOf(req: Request): string {
  return ipKeyGenerator(req.ip ?? req.socket.remoteAddress ?? 'unknown', 56);
}
