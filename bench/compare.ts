import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import { httpLoad, round, type LoadResult } from './load';
import { apiCaller, createBenchIdentity, gitCommit, HTTP_OPS, loadFigures, meanLoad, SERVER_ARGS, serverOptions, type HttpOp } from './run';
import { startService, startStack, type Service } from './stack';

/**
 * `npm run bench:compare`: the same HTTP loads against two or more variants of the API, started
 * side by side on one stack and loaded in turn, slice by slice (A, B, A, B …, the order reversed
 * every other round so neither always goes first). Each pair of slices runs seconds apart, so the
 * machine's drift, ±5% between bench runs minutes apart here, mostly cancels and a few percent
 * can be told apart. A variant is the API with some environment of its own (NODE_OPTIONS,
 * READ_THREAD, DATABASE_POOL_SIZE …) over what `npm run bench` gives it; the first variant is the
 * one the others are compared with. Only the loaded API is busy: the others sit idle.
 */
export interface Variant {
  label: string;
  env: Record<string, string>;
}

export interface CompareOptions {
  variants: Variant[];
  ops: HttpOp[];
  rounds: number;
  sliceSeconds: number;
  connections: number;
  /** Where the JSON goes (printed only when absent). */
  out?: string;
  pgAdminUrl?: string;
  temporalAddress?: string;
  smtpUrl?: string;
  log: (line: string) => void;
}

export const COMPARE_DEFAULTS: Omit<CompareOptions, 'variants'> = {
  ops: ['floor', 'vault.get', 'vault.totp'],
  rounds: 6,
  sliceSeconds: 2,
  connections: 32,
  log: (line) => process.stdout.write(`${line}\n`),
};

export interface VariantFigures {
  rps: number;
  p50: number;
  p90: number;
  p99: number;
  errors: number;
  slicesRps: number[];
  /** Mean req/s ÷ the first variant's. */
  vsFirst: number;
  /** Rounds in which this variant's slice beat the first variant's slice of the same round. */
  wins: number;
}

/** `label` or `label:KEY=VALUE,KEY=VALUE` (a value may hold spaces and `=`; a comma starts the next KEY=). */
export function parseVariant(spec: string): Variant {
  const colon = spec.indexOf(':');
  const label = (colon < 0 ? spec : spec.slice(0, colon)).trim();
  if (!label) throw new Error(`variant '${spec}' has no label (label or label:KEY=VALUE,…)`);
  const env: Record<string, string> = {};
  const rest = colon < 0 ? '' : spec.slice(colon + 1);
  for (const pair of rest ? rest.split(/,(?=[A-Za-z_][A-Za-z0-9_]*=)/) : []) {
    const m = /^([A-Za-z_][A-Za-z0-9_]*)=(.*)$/s.exec(pair);
    if (!m) throw new Error(`variant '${label}': '${pair}' is not KEY=VALUE`);
    env[m[1]!] = m[2]!;
  }
  return { label, env };
}

export async function runCompare(options: Partial<CompareOptions> & Pick<CompareOptions, 'variants'>): Promise<Record<string, unknown>> {
  const o: CompareOptions = { ...COMPARE_DEFAULTS, ...options };
  const labels = o.variants.map((v) => v.label);
  if (o.variants.length < 2) throw new Error('compare needs at least two variants (--variant, repeated)');
  if (new Set(labels).size !== labels.length) throw new Error(`variant labels must differ: ${labels.join(', ')}`);
  for (const op of o.ops) if (!(op in HTTP_OPS)) throw new Error(`unknown op '${op}' (one of ${Object.keys(HTTP_OPS).join(', ')})`);
  const startedAt = new Date();
  const dir = mkdtempSync(path.join(os.tmpdir(), 'mailgent-compare-'));
  const stack = await startStack(dir, { pgAdminUrl: o.pgAdminUrl, temporalAddress: o.temporalAddress, smtpUrl: o.smtpUrl });
  try {
    const apis: Service[] = [];
    for (const v of o.variants) {
      try {
        apis.push(await startService(stack, 'api', { env: v.env }));
      } catch (err) {
        throw new Error(`variant '${v.label}' did not start: ${(err as Error).message}`, { cause: err });
      }
    }
    const { token } = await createBenchIdentity(apiCaller(apis[0]!.url), stack.adminToken);
    const load = (api: Service, op: HttpOp) => {
      const spec = HTTP_OPS[op];
      return httpLoad({ url: api.url + spec.route, method: spec.method, token, body: spec.body, connections: o.connections, seconds: o.sliceSeconds });
    };
    o.log(`mailgent bench:compare: ${labels.join(' vs ')}; ${o.ops.join(', ')}; ${o.rounds} rounds of ${o.sliceSeconds} s slices at ${o.connections} connections`);
    // One unrecorded slice of each load on each variant first (JIT, caches, the read thread's start).
    for (const api of apis) for (const op of o.ops) await load(api, op);
    for (const api of apis) api.resetPeak();
    // slices[op][variant]: one load per round.
    const slices: LoadResult[][][] = o.ops.map(() => apis.map(() => []));
    for (let r = 0; r < o.rounds; r++) {
      const order = r % 2 === 0 ? [...apis.keys()] : [...apis.keys()].reverse();
      for (const [k, op] of o.ops.entries()) for (const i of order) slices[k]![i]!.push(await load(apis[i]!, op));
    }
    const ops: Record<string, Record<string, VariantFigures>> = {};
    for (const [k, op] of o.ops.entries()) {
      const first = slices[k]![0]!;
      const firstMean = meanLoad(first).rps;
      ops[op] = {};
      for (const [i, label] of labels.entries()) {
        const own = slices[k]![i]!;
        const mean = meanLoad(own);
        const { rps, p50, p90, p99, errors } = loadFigures(mean);
        ops[op][label] = {
          rps,
          p50,
          p90,
          p99,
          errors,
          slicesRps: own.map((s) => round(s.rps, 1)),
          vsFirst: firstMean > 0 ? round(mean.rps / firstMean, 3) : 0,
          wins: own.filter((s, r) => s.rps > first[r]!.rps).length,
        };
      }
    }
    const result = {
      schema: 1,
      startedAt: startedAt.toISOString(),
      options: { ops: o.ops, rounds: o.rounds, sliceSeconds: o.sliceSeconds, connections: o.connections },
      machine: { cpus: os.cpus().length, cpuModel: os.cpus()[0]?.model ?? 'unknown', platform: `${os.platform()} ${os.release()}` },
      versions: { commit: gitCommit(), node: process.version },
      method:
        'every variant is an API process on the same servers; each round loads each variant for one slice, in turn (the order reversed every other round); figures are means over the slices; wins counts rounds whose slice beat the first variant’s',
      variants: o.variants.map((v, i) => ({ label: v.label, env: v.env, peakRssMb: round(apis[i]!.peakRssMb(), 1) })),
      ops,
    };
    printTable(result.ops, labels, o.rounds, o.log);
    o.log(`peak RSS over the measured rounds: ${result.variants.map((v) => `${v.label} ${v.peakRssMb} MB`).join(', ')}`);
    if (o.out) {
      mkdirSync(path.dirname(o.out), { recursive: true });
      writeFileSync(o.out, `${JSON.stringify(result, null, 2)}\n`);
      o.log(`results in ${o.out}`);
    }
    return result;
  } finally {
    await stack.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}

function printTable(ops: Record<string, Record<string, VariantFigures>>, labels: string[], rounds: number, log: (line: string) => void): void {
  const width = Math.max(8, ...labels.map((l) => l.length));
  log('');
  log(`${'op'.padEnd(12)} ${'variant'.padEnd(width)}   req/s   p90 ms  p99 ms  vs first  wins`);
  for (const [op, byLabel] of Object.entries(ops)) {
    for (const [i, label] of labels.entries()) {
      const f = byLabel[label]!;
      const wins = i === 0 ? '-' : `${f.wins}/${rounds}`;
      log(`${op.padEnd(12)} ${label.padEnd(width)} ${f.rps.toFixed(0).padStart(7)} ${f.p90.toFixed(1).padStart(8)} ${f.p99.toFixed(1).padStart(7)}  ${f.vsFirst.toFixed(3).padStart(8)}  ${wins}${f.errors ? `  ${f.errors} errors` : ''}`);
    }
  }
}

function parseOptions(argv: string[]): Partial<CompareOptions> & Pick<CompareOptions, 'variants'> {
  const { values } = parseArgs({
    args: argv,
    options: {
      variant: { type: 'string', multiple: true },
      ops: { type: 'string' },
      rounds: { type: 'string' },
      'slice-seconds': { type: 'string' },
      connections: { type: 'string' },
      out: { type: 'string' },
      ...SERVER_ARGS,
    },
  });
  const positive = (name: string, s: string) => {
    const n = Number(s);
    if (!(n > 0)) throw new Error(`--${name} must be a positive number, not '${s}'`);
    return n;
  };
  const opts: Partial<CompareOptions> & Pick<CompareOptions, 'variants'> = { variants: (values.variant ?? []).map(parseVariant) };
  if (values.ops) opts.ops = values.ops.split(',').map((s) => s.trim()) as HttpOp[];
  if (values.rounds) opts.rounds = Math.round(positive('rounds', values.rounds));
  if (values['slice-seconds']) opts.sliceSeconds = positive('slice-seconds', values['slice-seconds']);
  if (values.connections) opts.connections = Math.round(positive('connections', values.connections));
  if (values.out) opts.out = path.resolve(values.out);
  return { ...opts, ...serverOptions(values) };
}

if (process.argv[1] && import.meta.url === pathToFileURL(path.resolve(process.argv[1])).href) {
  Promise.resolve()
    .then(() => runCompare(parseOptions(process.argv.slice(2))))
    .then(
      () => process.exit(0),
      (err) => {
        console.error(`bench:compare failed: ${(err as Error).message ?? err}`);
        process.exit(1);
      },
    );
}
