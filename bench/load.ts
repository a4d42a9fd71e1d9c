import autocannon from 'autocannon';

/** One measured load: throughput and latency percentiles (milliseconds), and what went wrong. */
export interface LoadResult {
  requests: number;
  seconds: number;
  rps: number;
  p50: number;
  p90: number;
  p99: number;
  max: number;
  errors: number;
}

export interface HttpLoad {
  url: string;
  method: 'GET' | 'POST';
  token: string;
  /**
   * The request body: one object sent with every request, or a function making one per request
   * (`i` counts the requests, for spreading writes over names).
   */
  body?: Record<string, unknown> | ((i: number) => unknown);
  connections: number;
  seconds: number;
}

/** Drives an endpoint with autocannon at a fixed number of connections for a fixed time. */
export async function httpLoad(load: HttpLoad): Promise<LoadResult> {
  const headers: Record<string, string> = { authorization: `Bearer ${load.token}` };
  if (load.body) headers['content-type'] = 'application/json';
  const body = load.body;
  let counter = 0;
  // A fixed body is serialised once and autocannon sends the same prepared request each time, as it
  // does for the floor's GET; a body made per request costs autocannon ~12 µs of the machine's CPU
  // per request, which the server under test then lacks.
  const result = await autocannon({
    url: load.url,
    method: load.method,
    headers,
    connections: load.connections,
    duration: load.seconds,
    ...(typeof body === 'function'
      ? { requests: [{ setupRequest: (req) => ({ ...req, body: JSON.stringify(body(counter++)) }) }] }
      : body
        ? { body: JSON.stringify(body) }
        : {}),
  });
  const good = result.requests.total - result.non2xx;
  return {
    requests: result.requests.total,
    seconds: load.seconds,
    rps: good / load.seconds,
    p50: result.latency.p50,
    p90: result.latency.p90,
    p99: result.latency.p99,
    max: result.latency.max,
    errors: result.errors + result.timeouts + result.non2xx,
  };
}

/**
 * The same shape of load without HTTP: `concurrency` loops calling `op` back to back for `seconds`.
 * Latency is measured around each call with the monotonic clock.
 */
export async function inProcessLoad(op: (i: number) => Promise<unknown>, concurrency: number, seconds: number): Promise<LoadResult> {
  const latencies: number[] = [];
  let errors = 0;
  let counter = 0;
  const started = performance.now();
  const end = started + seconds * 1000;
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (performance.now() < end) {
        const t = performance.now();
        try {
          await op(counter++);
          latencies.push(performance.now() - t);
        } catch {
          errors += 1;
        }
      }
    }),
  );
  const elapsed = (performance.now() - started) / 1000;
  latencies.sort((a, b) => a - b);
  const pct = (p: number) => (latencies.length ? latencies[Math.min(latencies.length - 1, Math.floor((p / 100) * latencies.length))]! : 0);
  return {
    requests: latencies.length + errors,
    seconds: elapsed,
    rps: latencies.length / elapsed,
    p50: round(pct(50)),
    p90: round(pct(90)),
    p99: round(pct(99)),
    max: round(latencies.at(-1) ?? 0),
    errors,
  };
}

export function round(n: number, digits = 2): number {
  const f = 10 ** digits;
  return Math.round(n * f) / f;
}
