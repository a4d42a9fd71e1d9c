import { createServer, IncomingMessage, ServerResponse, type Server } from 'node:http';
import type { Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import type { Express } from 'express';
import { PROBLEM_BASE } from './problem';

/** Request headers larger than this (all of them together) are refused with 431. */
export const MAX_HEADER_BYTES = 16 * 1024;

/**
 * Node's request and response classes, building objects that are Express's from the start.
 *
 * Express gives a request and its response their methods (`req.get`, `res.json` …) by swapping their
 * prototypes for `app.request` and `app.response` as they enter the app (Object.setPrototypeOf in
 * app.handle), and V8 pays for that: a bare Express 5 app here promoted ~7.5 KB a request to the old
 * generation (objects of every request outliving two scavenges, so two or three full collections a
 * second) and served ~7,500 req/s, where the same app with these classes promotes almost nothing
 * and serves ~21,000–23,000. Built on those prototypes, the objects need no swap: Express's
 * setPrototypeOf finds the prototype already in place and changes nothing.
 * Node 20's classes are constructor functions, called here on an object of the right prototype;
 * were they ES classes (which cannot be called so), the server keeps Node's own, as before. (Made
 * with Reflect.construct instead, they were slower than Node's own with the swap: ~5,000 req/s.)
 */
export function expressShaped(app: Express): { IncomingMessage?: typeof IncomingMessage; ServerResponse?: typeof ServerResponse } {
  const isClass = (f: unknown) => /^class\b/.test(Function.prototype.toString.call(f));
  if (isClass(IncomingMessage) || isClass(ServerResponse)) return {};
  type Ctor = (this: unknown, a: unknown, b?: unknown) => void;
  function Request(this: unknown, socket: unknown) {
    (IncomingMessage as unknown as Ctor).call(this, socket);
  }
  Request.prototype = app.request;
  function Response(this: unknown, req: unknown, options: unknown) {
    (ServerResponse as unknown as Ctor).call(this, req, options);
  }
  Response.prototype = app.response;
  return { IncomingMessage: Request as unknown as typeof IncomingMessage, ServerResponse: Response as unknown as typeof ServerResponse };
}

/**
 * The API's HTTP server. Requests Node's parser refuses before Express sees them (oversize
 * headers, a broken request line, bad characters in the path) still get a problem+json answer.
 */
interface ClientProblem {
  status: number;
  reason: string;
  slug: string;
  title: string;
  detail: string;
}

const MALFORMED: ClientProblem = { status: 400, reason: 'Bad Request', slug: 'malformed-request', title: 'Malformed request', detail: 'the request is not valid HTTP' };

/**
 * The answers Node's own handler gives these (a slow client's timeout is a 408 it may retry, not a
 * malformed request it must not), as problems. Anything else the parser refuses is MALFORMED.
 */
const CLIENT_ERRORS: Record<string, ClientProblem> = {
  HPE_HEADER_OVERFLOW: {
    status: 431,
    reason: 'Request Header Fields Too Large',
    slug: 'request-header-too-large',
    title: 'Request headers too large',
    detail: `the request headers are larger than ${MAX_HEADER_BYTES / 1024} KiB`,
  },
  // headersTimeout (60 s) or requestTimeout (300 s): the request did not arrive whole in time.
  ERR_HTTP_REQUEST_TIMEOUT: { status: 408, reason: 'Request Timeout', slug: 'request-timeout', title: 'Request timeout', detail: 'the request did not arrive in time; send it again' },
  HPE_CHUNK_EXTENSIONS_OVERFLOW: {
    status: 413,
    reason: 'Payload Too Large',
    slug: 'payload-too-large',
    title: 'Request too large',
    detail: 'the request body’s chunk extensions are too large',
  },
};

export function listen(app: Express, port: number, host: string): Server {
  // Host is not used for anything; without one the request still gets the API's own answer (a problem, not Node's bare 400).
  const server = createServer({ maxHeaderSize: MAX_HEADER_BYTES, requireHostHeader: false, ...expressShaped(app) }, app);
  server.on('clientError', (err: NodeJS.ErrnoException, socket: Duplex) => {
    if (err.code === 'ECONNRESET' || !socket.writable) {
      socket.destroy();
      return;
    }
    const { status, reason, slug, title, detail } = CLIENT_ERRORS[err.code ?? ''] ?? MALFORMED;
    const body = JSON.stringify({ type: PROBLEM_BASE + slug, title, status, detail });
    socket.end(
      `HTTP/1.1 ${status} ${reason}\r\nContent-Type: application/problem+json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n` +
        `Cache-Control: no-store\r\nConnection: close\r\n\r\n${body}`,
    );
  });
  // Open connections, for closeGracefully: one Set entry a connection, not a request.
  const sockets = new Set<Socket>();
  server.on('connection', (socket: Socket) => {
    sockets.add(socket);
    socket.once('close', () => sockets.delete(socket));
  });
  servers.set(server, sockets);
  server.listen(port, host);
  return server;
}

/** Each listening server's open connections. */
const servers = new WeakMap<Server, Set<Socket>>();

/**
 * Stops a server built by listen(): no new connections, idle ones closed at once, and every
 * response from now on, the ones in flight whose headers are not sent yet included, sent with
 * `Connection: close` and its connection closed after it (one whose headers went already: its
 * connection ended once it is sent). Resolves once every connection is gone; at `graceMs` what is still
 * open is cut (`onCut` is told first). Before, server.close() alone stopped new connections only: a
 * client reusing a kept-alive connection (a reverse proxy upstream does) was still served on it,
 * with keep-alive, so it never went idle, and the grace period's end cut whatever request it had in
 * flight then (a change perhaps committed, its answer lost).
 */
export async function closeGracefully(server: Server, graceMs: number, onCut: () => void): Promise<void> {
  // Before the app's own listener (added only now: nothing on the hot path while the server serves).
  server.prependListener('request', (_req: IncomingMessage, res: ServerResponse) => {
    res.shouldKeepAlive = false;
  });
  const closed = new Promise<void>((resolve) => server.close(() => resolve()));
  server.closeIdleConnections();
  for (const socket of servers.get(server) ?? []) {
    // The response in flight on the connection (Node's own link from a socket to its response).
    const res = (socket as Socket & { _httpMessage?: ServerResponse })._httpMessage;
    if (!res) continue;
    if (!res.headersSent) res.shouldKeepAlive = false;
    // Its headers already said keep-alive: its connection is closed once it is sent (what is still
    // buffered goes first, as Node closes a `Connection: close` one; not the server's every idle
    // connection, one still flushing among them; not end(), which leaves it readable: a request
    // arriving on it then would be carried out with no way to answer).
    else res.once('finish', () => socket.destroySoon());
  }
  const cut = setTimeout(() => {
    onCut();
    server.closeAllConnections();
  }, graceMs);
  try {
    await closed;
  } finally {
    clearTimeout(cut);
  }
}
