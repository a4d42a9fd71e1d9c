import { createServer, type Server } from 'node:http';
import type { Duplex } from 'node:stream';
import type { Express } from 'express';
import { PROBLEM_BASE } from './problem';

/** Request headers larger than this (all of them together) are refused with 431. */
export const MAX_HEADER_BYTES = 16 * 1024;

/**
 * The API's HTTP server. Requests Node's parser refuses before Express sees them (oversize
 * headers, a broken request line, bad characters in the path) still get a problem+json answer.
 */
export function listen(app: Express, port: number, host: string): Server {
  // Host is not used for anything; without one the request still gets the API's own answer (a problem, not Node's bare 400).
  const server = createServer({ maxHeaderSize: MAX_HEADER_BYTES, requireHostHeader: false }, app);
  server.on('clientError', (err: NodeJS.ErrnoException, socket: Duplex) => {
    if (err.code === 'ECONNRESET' || !socket.writable) {
      socket.destroy();
      return;
    }
    const tooLarge = err.code === 'HPE_HEADER_OVERFLOW';
    const [status, reason] = tooLarge ? [431, 'Request Header Fields Too Large'] : [400, 'Bad Request'];
    const body = JSON.stringify({
      type: PROBLEM_BASE + (tooLarge ? 'request-header-too-large' : 'malformed-request'),
      title: tooLarge ? 'Request headers too large' : 'Malformed request',
      status,
      detail: tooLarge ? `the request headers are larger than ${MAX_HEADER_BYTES / 1024} KiB` : 'the request is not valid HTTP',
    });
    socket.end(
      `HTTP/1.1 ${status} ${reason}\r\nContent-Type: application/problem+json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n` +
        `Cache-Control: no-store\r\nConnection: close\r\n\r\n${body}`,
    );
  });
  server.listen(port, host);
  return server;
}
