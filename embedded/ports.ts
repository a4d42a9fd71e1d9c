import { readFileSync } from 'node:fs';
import net from 'node:net';

/**
 * A TCP port that was free on 127.0.0.1 a moment ago, for a server this process is about to start.
 * Where the kernel says which ports it hands out to outgoing connections (Linux), the port is drawn
 * from below that range: a port the kernel picks for `listen(0)` is an ephemeral one, which any
 * outgoing connection can be given before the server binds it ('address already in use'). Only
 * another server choosing the same port in between can still take it: withFreshPorts covers that.
 */
export async function freePort(): Promise<number> {
  const below = ephemeralRangeStart();
  if (below !== undefined && below > LOWEST + 1_000) {
    for (let attempt = 0; attempt < 50; attempt++) {
      const port = LOWEST + Math.floor(Math.random() * (below - LOWEST));
      if (await canListen(port)) return port;
    }
  }
  return kernelChosenPort();
}

/** Above the registered ports most services use by default. */
const LOWEST = 20_000;

function ephemeralRangeStart(): number | undefined {
  try {
    const low = Number(readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/)[0]);
    return Number.isInteger(low) && low > 0 ? low : undefined;
  } catch {
    return undefined;
  }
}

function canListen(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const server = net.createServer();
    server.unref();
    server.once('error', () => resolve(false));
    server.listen(port, '127.0.0.1', () => server.close(() => resolve(true)));
  });
}

function kernelChosenPort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.unref();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(port));
    });
  });
}

/**
 * Starts a server on ports from freePort(), again with new ones when one was taken in between (by
 * another server, or by an outgoing connection where freePort() had to take an ephemeral port).
 * `start` must pick its ports afresh on each call and leave nothing running when it fails.
 */
export async function withFreshPorts<T>(start: () => Promise<T>, attempts = 3): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await start();
    } catch (err) {
      if (attempt >= attempts || !/address already in use/i.test((err as Error).message)) throw err;
    }
  }
}
