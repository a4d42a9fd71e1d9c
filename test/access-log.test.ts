import { once } from 'node:events';
import { request, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { Writable } from 'node:stream';
import express from 'express';
import { afterEach, describe, expect, it } from 'vitest';
import { accessLog } from '../api/access-log';
import { createLogger } from '../core/logger';

/** The API's request log (api/access-log.ts) on a real HTTP server. */
describe('access log', () => {
  let server: Server | undefined;
  afterEach(async () => {
    server?.closeAllConnections();
    if (server) await new Promise((resolve) => server!.close(resolve));
    server = undefined;
  });

  const start = async (level: string) => {
    const lines: Record<string, any>[] = [];
    const destination = new Writable({
      write(chunk, _encoding, callback) {
        lines.push(...String(chunk).trim().split('\n').map((l) => JSON.parse(l)));
        callback();
      },
    });
    const app = express();
    app.use((_req, res, next) => {
      res.locals.requestId = 'req-1';
      next();
    });
    app.use(accessLog(createLogger({ level, destination })));
    app.get('/ok', (_req, res) => {
      res.locals.identity = { id: 'identity-1' };
      res.json({ ok: true });
    });
    app.get('/broken', (_req, res) => {
      res.status(500).json({ title: 'Internal Server Error' });
    });
    app.get('/hang', () => {});
    app.get('/hang/:ref', () => {});
    app.get('/things/:ref', (req, res) => {
      res.status(req.params.ref === 'known' ? 200 : 404).json({});
    });
    server = app.listen(0, '127.0.0.1');
    await once(server, 'listening');
    const port = (server.address() as AddressInfo).port;
    const get = (path: string, abortAfterMs?: number) =>
      new Promise<number | 'aborted'>((resolve, reject) => {
        const req = request({ host: '127.0.0.1', port, path, headers: { authorization: 'Bearer mg_secret_token_value' } }, (res) => {
          res.resume();
          res.on('end', () => resolve(res.statusCode!));
        });
        req.on('error', (err) => (abortAfterMs ? resolve('aborted') : reject(err)));
        if (abortAfterMs) setTimeout(() => req.destroy(), abortAfterMs);
        req.end();
      });
    const settle = async (count: number) => {
      for (let i = 0; i < 100 && lines.length < count; i++) await new Promise((r) => setTimeout(r, 10));
      return lines;
    };
    return { get, settle, lines };
  };

  it('writes one line per request: method, path without the query, status, time, request id, identity; no headers', async () => {
    const { get, settle } = await start('info');
    expect(await get('/ok?token=query-secret&x=1')).toBe(200);
    const lines = await settle(1);
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatchObject({
      level: 30,
      msg: 'request completed',
      req: { id: 'req-1', method: 'GET', path: '/ok' },
      res: { statusCode: 200 },
      identity: 'identity-1',
    });
    expect(lines[0]!.responseTime).toEqual(expect.any(Number));
    expect(JSON.stringify(lines)).not.toMatch(/query-secret|mg_secret_token_value|authorization/i);
  });

  it('logs only what its level allows: server errors at error, abandoned requests at warn', async () => {
    const { get, settle, lines } = await start('warn');
    expect(await get('/ok')).toBe(200);
    expect(await get('/broken')).toBe(500);
    expect(await get('/hang', 100)).toBe('aborted');
    await settle(2);
    await new Promise((r) => setTimeout(r, 50));
    expect(lines.map((l) => [l.level, l.msg, l.req.path, l.res.statusCode])).toEqual([
      [50, 'request completed', '/broken', 500],
      [40, 'request aborted', '/hang', 200],
    ]);
  });

  it("shows a failed request's route pattern, not its path, when the route has parameters: what found nothing may be a value pasted there", async () => {
    const { get, settle } = await start('info');
    expect(await get('/things/known')).toBe(200);
    expect(await get('/things/sk_live_pasted_value?x=1')).toBe(404);
    expect(await get('/nowhere/sk_live_pasted_value')).toBe(404);
    const lines = await settle(3);
    expect(lines.map((l) => [l.req.path, l.res.statusCode])).toEqual([
      ['/things/known', 200],
      ['/things/:ref', 404],
      // (A path no route matched: this app has no maskPath, so nothing of it is shown. The service's shows the segments routes have, bad-input.test.)
      ['…', 404],
    ]);
  });

  it('a request abandoned on a route with parameters shows the route pattern: it was never answered, so nothing vetted its path', async () => {
    const { get, settle } = await start('info');
    expect(await get('/hang/sk_live_pasted_value', 100)).toBe('aborted');
    const lines = await settle(1);
    await new Promise((r) => setTimeout(r, 50));
    // Before, its status was still the default 200, and the path was logged as sent.
    expect(lines.map((l) => [l.level, l.msg, l.req.path, l.res.statusCode])).toEqual([[40, 'request aborted', '/hang/:ref', 200]]);
    expect(JSON.stringify(lines)).not.toContain('sk_live_pasted_value');
  });
});
