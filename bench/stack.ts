import { randomBytes } from 'node:crypto';
import { chmodSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parse as parseYaml } from 'yaml';
import { startChild, type Child } from '../embedded/child';
import { freePort } from '../embedded/ports';
import { startEmbeddedPostgres, withClient } from '../embedded/postgres';
import { startSmtpSink } from '../embedded/smtp-sink';
import { startEmbeddedTemporal } from '../embedded/temporal';
import { migrate } from '../db/pool';
import { newToken } from '../vault/identities';
import { generateMasterKey, masterKeyId, writeKeyringFile } from '../vault/keyring';

/**
 * The servers a benchmark runs against: the embedded PostgreSQL, Temporal dev server and SMTP sink
 * (the same code `npm start` uses) or external ones, a database of its own, and the API and the
 * worker as real child processes (`cli/main.ts api|worker`) so their memory can be measured.
 */
export const ROOT = fileURLToPath(new URL('..', import.meta.url));
const TSX = import.meta.resolve('tsx');

export interface External {
  pgAdminUrl?: string;
  temporalAddress?: string;
  smtpUrl?: string;
}

export interface Stack {
  dir: string;
  databaseUrl: string;
  temporalAddress: string;
  smtpUrl: string;
  keyringFile: string;
  adminToken: string;
  taskQueue: string;
  postgresVersion: string;
  /** One more database on the same server, migrated, dropped with the stack: its URL. */
  addDatabase(): Promise<string>;
  /** Stops what `start` started, in reverse. */
  stop(): Promise<void>;
  onStop(fn: () => Promise<unknown>): void;
}

export async function startStack(dir: string, external: External = {}): Promise<Stack> {
  mkdirSync(dir, { recursive: true });
  // The embedded PostgreSQL runs as another OS user when we are root: let it pass through.
  chmodSync(dir, 0o711);
  const stops: (() => Promise<unknown>)[] = [];
  const stop = async () => {
    for (const fn of stops.reverse()) await fn().catch((err) => console.error('bench: stopping failed:', (err as Error).message));
    stops.length = 0;
  };
  try {
    const [pgServer, temporal, smtp] = await Promise.all([
      external.pgAdminUrl ? { adminUrl: external.pgAdminUrl } : track(stops, startEmbeddedPostgres({ dataDir: path.join(dir, 'pg') })),
      external.temporalAddress
        ? { address: external.temporalAddress }
        : track(stops, startEmbeddedTemporal({ dataDir: path.join(dir, 'temporal'), namespace: 'default', cliPath: process.env.TEMPORAL_CLI_PATH })),
      external.smtpUrl ? { url: external.smtpUrl } : track(stops, startSmtpSink({ mailDir: path.join(dir, 'mail') })),
    ]);
    const tag = randomBytes(4).toString('hex');
    let databases = 0;
    const addDatabase = async (): Promise<string> => {
      const database = `bench_${tag}_${(databases += 1)}`;
      await withClient(pgServer.adminUrl, (c) => c.query(`CREATE DATABASE ${database}`));
      stops.push(() => withClient(pgServer.adminUrl, (c) => c.query(`DROP DATABASE IF EXISTS ${database} WITH (FORCE)`)));
      const u = new URL(pgServer.adminUrl);
      u.pathname = `/${database}`;
      const url = u.toString();
      await migrate(url);
      return url;
    };
    const databaseUrl = await addDatabase();
    const postgresVersion = await withClient(pgServer.adminUrl, async (c) => (await c.query('SHOW server_version')).rows[0].server_version as string);

    const keyringFile = path.join(dir, `master-keys-${tag}.json`);
    const master = generateMasterKey();
    writeKeyringFile(keyringFile, [{ id: masterKeyId(master), key: master }], masterKeyId(master));
    return {
      dir,
      databaseUrl,
      temporalAddress: temporal.address,
      smtpUrl: smtp.url,
      keyringFile,
      adminToken: newToken(),
      taskQueue: `bench-${tag}`,
      postgresVersion,
      addDatabase,
      stop,
      onStop: (fn) => stops.push(fn),
    };
  } catch (err) {
    await stop();
    throw err;
  }
}

async function track<T extends { stop(): Promise<void> }>(stops: (() => Promise<unknown>)[], starting: Promise<T>): Promise<T> {
  const started = await starting;
  stops.push(() => started.stop());
  return started;
}

export interface Service {
  part: 'api' | 'worker';
  pid: number;
  url: string;
  logFile: string;
  /** Resets the kernel's peak-RSS mark (VmHWM), so the next peak is of what runs from now on. */
  resetPeak(): void;
  /** Peak RSS in MB since the last reset (VmHWM), or since start if the kernel refused the reset. */
  peakRssMb(): number;
  stop(): Promise<void>;
}

/** What of its process tuning docker-compose.yml gives this part (heap bounds, GC threads, malloc arenas), so the bench measures what ships. */
export const TUNING_VARIABLES = ['NODE_OPTIONS', 'MALLOC_ARENA_MAX'] as const;

export function productionTuning(part: 'api' | 'worker'): Partial<Record<(typeof TUNING_VARIABLES)[number], string>> {
  const compose = parseYaml(readFileSync(path.join(ROOT, 'docker-compose.yml'), 'utf8'), { merge: true }) as {
    services: Record<string, { environment?: Record<string, string> }>;
  };
  const env = compose.services[part]?.environment ?? {};
  return Object.fromEntries(TUNING_VARIABLES.filter((k) => env[k] !== undefined).map((k) => [k, String(env[k])]));
}

/** Runs `cli/main.ts api|worker` as a child process against the stack, and waits until it is ready. */
export async function startService(
  stack: Stack,
  part: 'api' | 'worker',
  opts: { env?: Record<string, string>; ready?: () => Promise<boolean> } = {},
): Promise<Service> {
  const port = part === 'api' ? await freePort() : 0;
  const dataDir = path.join(stack.dir, `${part}-data`);
  mkdirSync(dataDir, { recursive: true });
  const logFile = path.join(stack.dir, 'logs', `${part}-${Date.now()}.log`);
  // BENCH_NODE_ARGS='--cpu-prof --cpu-prof-dir=/tmp/prof' profiles the API and the worker.
  const nodeArgs = process.env.BENCH_NODE_ARGS?.split(' ').filter(Boolean) ?? [];
  const child: Child = startChild(process.execPath, [...nodeArgs, '--import', TSX, path.join(ROOT, 'cli/main.ts'), part], {
    logFile,
    deathSignal: 'TERM',
    env: {
      PATH: process.env.PATH ?? '',
      HOME: process.env.HOME ?? '',
      DATABASE_URL: stack.databaseUrl,
      TEMPORAL_ADDRESS: stack.temporalAddress,
      SMTP_URL: stack.smtpUrl,
      TASK_QUEUE: stack.taskQueue,
      VAULT_MASTER_KEY: stack.keyringFile,
      ADMIN_TOKEN: stack.adminToken,
      DATA_DIR: dataDir,
      ENV_FILES_ROOT: path.join(dataDir, 'env-files'),
      PORT: String(port || 8080),
      HOST: '127.0.0.1',
      LOG_LEVEL: 'warn',
      // The daily sweep must not fire in the middle of a measurement.
      SWEEP_CRON: '0 0 1 1 *',
      // The bench's webhook sink is on this machine.
      OUTBOUND_ALLOW: '127.0.0.1',
      ORPHAN_REPORT_CRON: '0 0 1 1 *',
      // A prebuilt workflow bundle, if the bench was given one (the worker skips bundling at start).
      ...(process.env.WORKFLOW_BUNDLE ? { WORKFLOW_BUNDLE: process.env.WORKFLOW_BUNDLE } : {}),
      ...productionTuning(part),
      ...opts.env,
    },
  });
  const url = part === 'api' ? `http://127.0.0.1:${port}` : '';
  const ready = opts.ready ?? (() => apiReady(url));
  const deadline = Date.now() + 180_000;
  for (;;) {
    if (!child.isRunning()) throw new Error(`the ${part} exited while starting:\n${child.logTail(30)}`);
    if (await ready()) break;
    if (Date.now() > deadline) {
      await child.stop();
      throw new Error(`the ${part} was not ready within 180 s:\n${child.logTail(30)}`);
    }
    await new Promise((r) => setTimeout(r, 250));
  }
  const service: Service = {
    part,
    pid: child.pid,
    url,
    logFile,
    resetPeak: () => resetPeak(child.pid),
    peakRssMb: () => procStatusMb(child.pid, 'VmHWM'),
    stop: () => child.stop('SIGTERM', 30_000),
  };
  stack.onStop(() => service.stop());
  return service;
}

async function apiReady(url: string): Promise<boolean> {
  try {
    return (await fetch(`${url}/readyz`)).ok;
  } catch {
    return false;
  }
}

function procStatusMb(pid: number, field: 'VmHWM' | 'VmRSS'): number {
  try {
    const line = readFileSync(`/proc/${pid}/status`, 'utf8')
      .split('\n')
      .find((l) => l.startsWith(`${field}:`));
    return line ? Number(/(\d+)/.exec(line)![1]) / 1024 : 0;
  } catch {
    return 0;
  }
}

function resetPeak(pid: number): void {
  try {
    // "5" resets the peak resident set size (Linux ≥ 4.0).
    writeFileSync(`/proc/${pid}/clear_refs`, '5');
  } catch {
    // Not allowed here: the peak then covers the whole life of the process.
  }
}
