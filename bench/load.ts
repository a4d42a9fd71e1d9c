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
  // autocannon's own percentiles are whole milliseconds (its histogram keeps integers, so 6.9 ms
  // counts as 6): at the ~3–10 ms measured here that is up to a third of a p50, and every figure read
  // low. Each 2xx answer's time (as autocannon counts them) is kept here instead, to the microsecond.
  const latencies: number[] = [];
  const result = await new Promise<autocannon.Result>((resolve, reject) => {
    const instance = autocannon(
      {
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
      },
      (err, res) => (err ? reject(err) : resolve(res)),
    );
    instance.on('response', (_client, statusCode, _bytes, responseTime) => {
      if (statusCode >= 200 && statusCode < 300) latencies.push(responseTime);
    });
  });
  const good = result.requests.total - result.non2xx;
  return {
    requests: result.requests.total,
    seconds: load.seconds,
    rps: good / load.seconds,
    ...percentiles(latencies),
    errors: result.errors + result.timeouts + result.non2xx,
  };
}

/** p50, p90, p99 and max of latencies in milliseconds (sorts them), to 10 µs; 0 for none. */
export function percentiles(latencies: number[]): Pick<LoadResult, 'p50' | 'p90' | 'p99' | 'max'> {
  latencies.sort((a, b) => a - b);
  const pct = (p: number) => (latencies.length ? latencies[Math.min(latencies.length - 1, Math.floor((p / 100) * latencies.length))]! : 0);
  return { p50: round(pct(50)), p90: round(pct(90)), p99: round(pct(99)), max: round(latencies.at(-1) ?? 0) };
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
  return { requests: latencies.length + errors, seconds: elapsed, rps: latencies.length / elapsed, ...percentiles(latencies), errors };
}

export function round(n: number, digits = 2): number {
  const f = 10 ** digits;
  return Math.round(n * f) / f;
}
