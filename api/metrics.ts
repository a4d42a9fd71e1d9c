import type { RequestHandler } from 'express';
import { collectDefaultMetrics, Counter, Histogram, Registry } from 'prom-client';

type Counts = Record<string, number>;

/**
 * Prometheus metrics for /metrics: process defaults plus requests by route and status. Labels use
 * the route pattern, never the raw path, so a probe with random paths cannot explode cardinality.
 */
export function createMetrics(opts: { readBatches?: () => Counts; storeBatches?: () => Counts } = {}): { registry: Registry; middleware: RequestHandler } {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry, prefix: 'mailgent_' });
  // Audited reads and stores are committed in groups (vault/read-batch.ts, vault/store-batch.ts): calls ÷ batches is the group size.
  if (opts.readBatches) {
    counters(registry, opts.readBatches, [
      ['batches', 'mailgent_vault_read_batches_total', 'Group commits of audited reads (vault.get, vault.totp), two statements each'],
      ['calls', 'mailgent_vault_read_batch_calls_total', 'Audited reads carried by those group commits'],
    ]);
  }
  if (opts.storeBatches) {
    counters(registry, opts.storeBatches, [
      ['batches', 'mailgent_vault_store_batches_total', 'Group commits of vault.store calls, one transaction each'],
      ['calls', 'mailgent_vault_store_batch_calls_total', 'vault.store calls carried by those group commits'],
      ['fallbacks', 'mailgent_vault_store_batch_rollbacks_total', 'Store batches rolled back, whose calls then stored one by one'],
    ]);
  }
  const requests = new Counter({
    name: 'mailgent_http_requests_total',
    help: 'HTTP requests by route pattern and status',
    labelNames: ['method', 'route', 'status'] as const,
    registers: [registry],
  });
  const duration = new Histogram({
    name: 'mailgent_http_request_duration_seconds',
    help: 'HTTP request duration by route pattern',
    labelNames: ['method', 'route'] as const,
    buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5],
    registers: [registry],
  });
  const middleware: RequestHandler = (req, res, next) => {
    const end = duration.startTimer();
    res.on('finish', () => {
      const route = req.route?.path ? String(req.route.path) : 'unmatched';
      requests.inc({ method: req.method, route, status: String(res.statusCode) });
      end({ method: req.method, route });
    });
    next();
  };
  return { registry, middleware };
}

/** Counters that report the growth of running totals kept elsewhere. */
function counters(registry: Registry, totals: () => Counts, fields: (readonly [string, string, string])[]): void {
  const seen: Counts = {};
  for (const [field, name, help] of fields) {
    seen[field] = 0;
    new Counter({
      name,
      help,
      registers: [registry],
      collect() {
        const now = totals()[field] ?? 0;
        this.inc(now - seen[field]!);
        seen[field] = now;
      },
    });
  }
}
