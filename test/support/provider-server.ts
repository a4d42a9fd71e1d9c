import { randomBytes } from 'node:crypto';
import { once } from 'node:events';
import http from 'node:http';
import type { AddressInfo } from 'node:net';

/**
 * A small real API-key service for provider and workflow tests, on 127.0.0.1:
 *   POST /keys        admin token required → 201 {id, secret}; the same Idempotency-Key gets the same key back
 *   GET /whoami       Bearer <secret> → 200 {id} while the key is active, else 401
 *   DELETE /keys/:id  admin token required → 200, or 404 for a key that is unknown or already deleted
 * It counts what it really did and logs every request without a secret. Faults can be injected per
 * route; their error bodies echo the Authorization header, as a careless provider might, so tests
 * prove that callers never repeat a body.
 */
export type Route = 'create' | 'whoami' | 'revoke';

export interface RequestLog {
  route: Route | null;
  method: string;
  path: string;
  status: number;
  idempotencyKey?: string;
  /** The JSON body of a create (settings, not secrets). */
  body?: unknown;
}

interface Fault {
  remaining: number;
  /** Held until released (the request has arrived when `reached` resolves). */
  hold?: { reached: () => void; released: Promise<void> };
  status?: number;
  /** Fail only after doing the work: the key is minted or deleted, the answer is lost. */
  afterEffect?: boolean;
  delayMs?: number;
}

interface Key {
  id: string;
  secret: string;
  active: boolean;
  idempotencyKey?: string;
}

export class ProviderServer {
  readonly adminToken = `adm_${randomBytes(24).toString('hex')}`;
  url = '';
  /** Distinct keys actually minted. */
  creates = 0;
  /** Keys actually deleted. */
  revokes = 0;
  readonly requests: RequestLog[] = [];
  private readonly keys = new Map<string, Key>();
  private readonly faults = new Map<Route, Fault[]>();
  private readonly server = http.createServer((req, res) => {
    this.handle(req, res).catch(() => {
      if (!res.headersSent) res.writeHead(500);
      res.end();
    });
  });

  async start(): Promise<this> {
    this.server.listen(0, '127.0.0.1');
    await once(this.server, 'listening');
    this.url = `http://127.0.0.1:${(this.server.address() as AddressInfo).port}`;
    return this;
  }

  async stop(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise((resolve) => this.server.close(resolve));
  }

  /** The next `count` requests of `route` answer `status`; with afterEffect, after doing their work. */
  failNext(route: Route, count: number, status: number, opts: { afterEffect?: boolean } = {}): void {
    this.queueFault(route, { remaining: count, status, afterEffect: opts.afterEffect });
  }

  /** The next `count` requests of `route` wait `ms` before they are handled. */
  delayNext(route: Route, count: number, ms: number): void {
    this.queueFault(route, { remaining: count, delayMs: ms });
  }

  /** The next request of `route` is held, once it has arrived, until `release()`. */
  holdNext(route: Route): { reached: Promise<void>; release: () => void } {
    let reached!: () => void;
    let release!: () => void;
    const reachedP = new Promise<void>((resolve) => (reached = resolve));
    const released = new Promise<void>((resolve) => (release = resolve));
    this.queueFault(route, { remaining: 1, hold: { reached, released } });
    return { reached: reachedP, release };
  }

  isActive(secret: string): boolean {
    return [...this.keys.values()].some((k) => k.secret === secret && k.active);
  }

  /** Minted keys without their secrets. */
  listKeys(): { id: string; active: boolean; idempotencyKey?: string }[] {
    return [...this.keys.values()].map(({ id, active, idempotencyKey }) => ({ id, active, idempotencyKey }));
  }

  private queueFault(route: Route, fault: Fault): void {
    this.faults.set(route, [...(this.faults.get(route) ?? []), fault]);
  }

  private takeFault(route: Route): Fault | undefined {
    const fault = this.faults.get(route)?.[0];
    if (fault && --fault.remaining <= 0) this.faults.get(route)!.shift();
    return fault;
  }

  private async handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const path = new URL(req.url ?? '/', 'http://localhost').pathname;
    const revokeId = /^\/keys\/([^/]+)$/.exec(path)?.[1];
    const route: Route | null =
      req.method === 'POST' && path === '/keys' ? 'create' : req.method === 'GET' && path === '/whoami' ? 'whoami' : req.method === 'DELETE' && revokeId ? 'revoke' : null;
    const idempotencyKey = header(req, 'idempotency-key');
    const raw = await readBody(req);
    const log: RequestLog = { route, method: req.method ?? '', path, status: 0, ...(idempotencyKey ? { idempotencyKey } : {}) };
    this.requests.push(log);
    const reply = (status: number, body?: unknown) => {
      log.status = status;
      res.writeHead(status, body === undefined ? {} : { 'content-type': 'application/json' });
      res.end(body === undefined ? undefined : JSON.stringify(body));
    };
    if (!route) return reply(404, { error: 'no such route' });

    const fault = this.takeFault(route);
    if (fault?.delayMs) await new Promise((r) => setTimeout(r, fault.delayMs));
    if (fault?.hold) {
      fault.hold.reached();
      await fault.hold.released;
    }
    const injected = () => reply(fault!.status!, { error: 'injected failure', youSent: header(req, 'authorization') });
    if (fault?.status && !fault.afterEffect) return injected();

    const bearer = /^Bearer (.+)$/.exec(header(req, 'authorization') ?? '')?.[1];
    let status: number;
    let body: unknown;
    if (route === 'whoami') {
      const key = [...this.keys.values()].find((k) => k.secret === bearer && k.active);
      [status, body] = key ? [200, { id: key.id }] : [401, { error: 'unknown or revoked key' }];
    } else if (bearer !== this.adminToken) {
      [status, body] = [401, { error: 'admin token required' }];
    } else if (route === 'create') {
      log.body = raw ? JSON.parse(raw) : undefined;
      const earlier = idempotencyKey ? [...this.keys.values()].find((k) => k.idempotencyKey === idempotencyKey) : undefined;
      const key = earlier ?? this.mint(idempotencyKey);
      [status, body] = [201, { id: key.id, secret: key.secret }];
    } else {
      const key = this.keys.get(decodeURIComponent(revokeId!));
      if (key?.active) {
        key.active = false;
        this.revokes++;
        [status, body] = [200, { id: key.id, deleted: true }];
      } else {
        [status, body] = [404, { error: 'no such key' }];
      }
    }
    if (fault?.status) return injected();
    reply(status, body);
  }

  private mint(idempotencyKey: string | undefined): Key {
    const key: Key = { id: `key_${randomBytes(6).toString('hex')}`, secret: `sk_${randomBytes(20).toString('hex')}`, active: true, idempotencyKey };
    this.keys.set(key.id, key);
    this.creates++;
    return key;
  }
}

function header(req: http.IncomingMessage, name: string): string | undefined {
  const value = req.headers[name];
  return Array.isArray(value) ? value[0] : value;
}

async function readBody(req: http.IncomingMessage): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const chunk of req) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks).toString('utf8');
}
