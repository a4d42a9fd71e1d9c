import { once } from 'node:events';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { describe, expect, it } from 'vitest';
import { httpLoad, percentiles } from '../../bench/load';

describe("the bench's HTTP load", () => {
  it('reports latency to the microsecond, not in whole milliseconds', { timeout: 20_000 }, async () => {
    // Every answer takes at least 2.6 ms; whole milliseconds (autocannon's own percentiles) say 2.
    const HOLD_MS = 2.6;
    let served = 0;
    const server = createServer((req, res) => {
      const until = performance.now() + HOLD_MS;
      while (performance.now() < until);
      served += 1;
      res.writeHead(req.url === '/refuse' ? 503 : 200, { 'content-type': 'application/json' }).end('{}');
    }).listen(0, '127.0.0.1');
    await once(server, 'listening');
    try {
      const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
      const r = await httpLoad({ url: `${url}/ok`, method: 'GET', token: 't', connections: 1, seconds: 1 });
      expect(r.errors).toBe(0);
      expect(r.requests).toBeGreaterThan(10);
      expect(r.requests).toBeLessThanOrEqual(served);
      expect(r.p50).toBeGreaterThanOrEqual(HOLD_MS);
      expect(r.p90).toBeGreaterThanOrEqual(r.p50);
      expect(r.p99).toBeGreaterThanOrEqual(r.p90);
      expect(r.max).toBeGreaterThanOrEqual(r.p99);
      expect(r.rps).toBeLessThanOrEqual(1000 / HOLD_MS);

      // Answers that are not 2xx count as errors and add no latency.
      const refused = await httpLoad({ url: `${url}/refuse`, method: 'GET', token: 't', connections: 1, seconds: 1 });
      expect(refused.errors).toBe(refused.requests);
      expect(refused).toMatchObject({ rps: 0, p50: 0, p99: 0, max: 0 });
    } finally {
      server.close();
      await once(server, 'close');
    }
  });

  it('takes percentiles by rank from the sorted latencies', () => {
    const latencies = Array.from({ length: 200 }, (_, i) => (200 - i) / 10); // 20.0 … 0.1 ms
    expect(percentiles(latencies)).toEqual({ p50: 10.1, p90: 18.1, p99: 19.9, max: 20 });
    expect(percentiles([])).toEqual({ p50: 0, p90: 0, p99: 0, max: 0 });
  });
});
