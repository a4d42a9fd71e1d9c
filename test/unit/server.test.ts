import { once } from 'node:events';
import http, { IncomingMessage, type Server, ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { Duplex } from 'node:stream';
import express from 'express';
import { afterEach, describe, expect, it } from 'vitest';
import { closeGracefully, listen } from '../../api/server';

describe("the API's HTTP server", () => {
  let server: Server | undefined;
  afterEach(async () => {
    if (!server) return;
    server.close();
    await once(server, 'close');
    server = undefined;
  });

  it("builds each request and response on the app's prototypes, so Express has none to swap, and they still work as Node's and Express's", async () => {
    const app = express();
    app.post('/echo', express.json(), (req, res) => {
      res.status(201).set('X-Seen', req.get('x-probe') ?? '').json({ body: req.body, isNodeRequest: req instanceof IncomingMessage, isNodeResponse: res instanceof ServerResponse });
    });
    server = listen(app, 0, '127.0.0.1');
    await once(server, 'listening');
    const arrived: { request: boolean; response: boolean }[] = [];
    // Before the app's own listener, which swaps any prototype it finds otherwise.
    server.prependListener('request', (req, res) => {
      arrived.push({ request: Object.getPrototypeOf(req) === app.request, response: Object.getPrototypeOf(res) === app.response });
    });
    const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
    for (let i = 0; i < 2; i++) {
      const res = await fetch(`${url}/echo`, { method: 'POST', headers: { 'content-type': 'application/json', 'x-probe': `p${i}` }, body: JSON.stringify({ i }) });
      expect(res.status).toBe(201);
      expect(res.headers.get('x-seen')).toBe(`p${i}`);
      expect(await res.json()).toEqual({ body: { i }, isNodeRequest: true, isNodeResponse: true });
    }
    expect(arrived).toEqual([
      { request: true, response: true },
      { request: true, response: true },
    ]);
  });

  it('answers a request that did not arrive in time with a 408 problem (it may be sent again), not as malformed HTTP', async () => {
    server = listen(express(), 0, '127.0.0.1');
    await once(server, 'listening');
    const answerTo = (code: string) => {
      let written = '';
      const socket = new Duplex({
        read() {},
        write(chunk, _encoding, done) {
          written += String(chunk);
          done();
        },
      });
      server!.emit('clientError', Object.assign(new Error(code), { code }), socket);
      return written;
    };
    // What Node's own handler answers these (headersTimeout, requestTimeout; chunk extensions), as problems.
    const timeout = answerTo('ERR_HTTP_REQUEST_TIMEOUT');
    expect(timeout).toMatch(/^HTTP\/1\.1 408 Request Timeout\r\n/);
    expect(JSON.parse(timeout.split('\r\n\r\n')[1]!)).toMatchObject({ type: 'https://mailgent.dev/problems/request-timeout', status: 408 });
    expect(answerTo('HPE_CHUNK_EXTENSIONS_OVERFLOW')).toMatch(/^HTTP\/1\.1 413 /);
    expect(answerTo('HPE_HEADER_OVERFLOW')).toMatch(/^HTTP\/1\.1 431 /);
    expect(answerTo('HPE_INVALID_METHOD')).toMatch(/^HTTP\/1\.1 400 [\s\S]*malformed-request/);
  });
  it('closeGracefully: responses in flight close their kept-alive connections, which are not served again, and the server closes without waiting out the grace', async () => {
    const app = express();
    let release!: () => void;
    const held = new Promise<void>((resolve) => (release = resolve));
    let arrived = 0;
    app.get('/slow', async (_req, res) => {
      arrived += 1;
      await held;
      res.send('slow');
    });
    // Its headers go before the drain begins (keep-alive), its body after.
    app.get('/stream', async (_req, res) => {
      arrived += 1;
      res.writeHead(200, { 'content-type': 'text/plain' });
      res.write('part ');
      await held;
      res.end('end');
    });
    app.get('/fast', (_req, res) => res.send('fast'));
    const srv = listen(app, 0, '127.0.0.1');
    server = srv;
    await once(srv, 'listening');
    srv.keepAliveTimeout = 30_000; // a connection left kept-alive would hold the close this long
    const port = (srv.address() as AddressInfo).port;
    const agent = new http.Agent({ keepAlive: true, maxSockets: 2 });
    const get = (path: string) =>
      new Promise<{ connection?: string; body: string }>((resolve, reject) => {
        http
          .get({ host: '127.0.0.1', port, path, agent }, (res) => {
            let body = '';
            res.setEncoding('utf8').on('data', (d: string) => (body += d));
            res.on('end', () => resolve({ connection: res.headers.connection, body }));
          })
          .on('error', reject);
      });
    try {
      // Both connections were used before (kept alive, as a proxy keeps them).
      expect(await Promise.all([get('/fast'), get('/fast')])).toEqual([
        { connection: 'keep-alive', body: 'fast' },
        { connection: 'keep-alive', body: 'fast' },
      ]);
      const slow = get('/slow');
      const stream = get('/stream');
      while (arrived < 2) await new Promise((resolve) => setTimeout(resolve, 10));
      let cut = false;
      const started = Date.now();
      const closing = closeGracefully(srv, 20_000, () => (cut = true));
      release();
      // Before, the slow one was answered keep-alive, and the next request was served on its connection.
      expect(await slow).toEqual({ connection: 'close', body: 'slow' });
      expect(await stream).toEqual({ connection: 'keep-alive', body: 'part end' });
      await closing;
      server = undefined;
      expect(cut).toBe(false);
      expect(Date.now() - started).toBeLessThan(5_000);
      // Not served: refused, or (a kept-alive socket the agent had not yet seen closed) hung up.
      await expect(get('/fast')).rejects.toMatchObject({ code: expect.stringMatching(/^ECONN(REFUSED|RESET)$/) });
    } finally {
      release();
      agent.destroy();
    }
  });
});
