import { randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { createWriteStream, mkdirSync, readFileSync } from 'node:fs';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import pg from 'pg';
import { Client, Connection } from '@temporalio/client';
import { NativeConnection, type ActivityInterceptorsFactory } from '@temporalio/worker';
import { inject } from 'vitest';
import { createApp } from '../../api/app';
import { listen } from '../../api/server';
import { createLogger } from '../../core/logger';
import { openServices, type Services } from '../../core/services';
import { newToken } from '../../vault/identities';
import { generateMasterKey, Keyring, masterKeyId, writeKeyringFile } from '../../vault/keyring';
import type { ActivityDeps } from '../../activities';
import { activityDeps } from '../../worker/deps';
import { createWorker, installTemporalLogging, type ServiceWorker } from '../../worker/worker';
import { withDatabase } from './global-setup';
import { decodedHistoryText } from './leaks';
import { recordPlace, registerSecrets } from './sweep';
import { allowOutbound } from '../../core/outbound';

/** What the tests' own servers need: they listen on this machine. */
export const TEST_OUTBOUND_ALLOW = ['127.0.0.1', 'localhost'];

/**
 * One test file's world: its own database (cloned from the migrated template), keyring, admin
 * token, Temporal task queue and, when asked, a worker — all against the run's real servers.
 * The API runs in-process on a real HTTP port; the product code is the same as `npm start`'s.
 */
export interface Harness {
  url: string;
  /** The activity dependencies the in-process worker uses (also for calling activities directly). */
  deps: ActivityDeps;
  /** Where env-file dependents may write. */
  envFilesRoot: string;
  /** Environment for running `cli/main.ts worker` against this harness (as a child process). */
  workerEnv(): Record<string, string>;
  adminToken: string;
  databaseUrl: string;
  keyringFile: string;
  services: Services;
  client: Client;
  taskQueue: string;
  logFile: string;
  /** Runs SQL on this file's database as the superuser (for fixtures and tampering). */
  sql<R extends pg.QueryResultRow = any>(text: string, params?: unknown[]): Promise<pg.QueryResult<R>>;
  api(method: string, route: string, opts?: { token?: string; body?: unknown; raw?: string; headers?: Record<string, string> }): Promise<ApiResponse>;
  createIdentity(name?: string, email?: string): Promise<{ id: string; token: string; name: string }>;
  /** Remembers a secret value so the leak check can look for it. */
  secret<T extends string>(value: T): T;
  secrets: string[];
  /**
   * Marks a value a test stores that is public text on purpose (an address, an id): the leak check,
   * which looks for every stored value, leaves it out.
   */
  publicValue<T extends string>(value: T): T;
  publicValues: Set<string>;
  close(): Promise<void>;
}

export interface ApiResponse {
  status: number;
  headers: Headers;
  body: any;
  text: string;
}

export async function startHarness(
  opts: {
    worker?: boolean;
    clock?: () => Date;
    smtpUrl?: string;
    securityNotify?: string[];
    /** Around every activity the worker runs: a test holds a real activity at the moment it needs. */
    activityInterceptors?: ActivityInterceptorsFactory[];
    /** Activities the worker runs at once on the rotations' queue (the SDK's default otherwise). */
    workerActivitySlots?: number;
    /** Invalid tokens a client may present per window before it is throttled (the service default otherwise). */
    authFailures?: { maxFailures: number; windowMs: number };
    /** A Temporal server of the test's own (the fault suite restarts one); the run's shared server otherwise. */
    temporalAddress?: string;
    /** host:port through which the API and workers reach PostgreSQL (a fault proxy); h.sql stays direct. */
    databaseHost?: string;
    /** Rotations one batch keeps open at once (the service default otherwise). */
    maxOpenRotations?: number;
    /** How long a delivery waits for its message's commit (activities' MESSAGE_COMMIT_WAIT_MS otherwise). */
    messageCommitWaitMs?: number;
  } = {},
): Promise<Harness> {
  const tag = randomBytes(4).toString('hex');
  const dbName = `t_${tag}`;
  const adminUrl = inject('pgAdminUrl');
  await createDatabase(adminUrl, dbName, inject('templateDb'));
  const databaseUrl = withDatabase(adminUrl, dbName);
  const serviceDatabaseUrl = opts.databaseHost ? withHost(databaseUrl, opts.databaseHost) : databaseUrl;
  const temporalAddress = opts.temporalAddress ?? inject('temporalAddress');

  const dir = path.join(inject('tmpDir'), `harness-${tag}`);
  mkdirSync(dir, { recursive: true });
  const keyringFile = path.join(dir, 'master-keys.json');
  const master = generateMasterKey();
  writeKeyringFile(keyringFile, [{ id: masterKeyId(master), key: master }], masterKeyId(master));
  const logFile = path.join(dir, 'service.log');
  const logStream = createWriteStream(logFile);
  const logger = createLogger({ level: 'info', destination: logStream });
  const sdkLogsElsewhere = quietTemporal(logger);

  const services = openServices({
    databaseUrl: serviceDatabaseUrl,
    poolSize: 10,
    keyring: Keyring.fromSetting(keyringFile),
    smtpUrl: opts.smtpUrl ?? inject('smtpUrl'),
    mailFrom: 'mailgent-test@localhost',
    logger,
    clock: opts.clock,
    // As `npm start` runs the API: reads in their own thread, unless the test brings its own clock.
    readThread: !opts.clock,
  });
  await services.ready();
  const superuser = new pg.Pool({ connectionString: databaseUrl, max: 2 });
  // pool.end() resolves once its clients are told to end, not once their connections have closed, so
  // the DROP DATABASE … WITH (FORCE) of close() can terminate one first (57P01), and the pool
  // re-emits that as an 'error' that nobody listens to. Expected then; a failure at any other time
  // stays an uncaught error.
  let closing = false;
  superuser.on('error', (err) => {
    if (!closing) throw err;
  });
  const connection = await Connection.connect({ address: temporalAddress });
  const client = new Client({ connection, namespace: 'default', dataConverter: services.dataConverter });
  const taskQueue = `test-${tag}`;
  const envFilesRoot = path.join(dir, 'env-files');
  mkdirSync(envFilesRoot, { recursive: true });
  // The tests' providers and webhook receivers listen on this machine (core/outbound.ts refuses that by default).
  allowOutbound(TEST_OUTBOUND_ALLOW);
  const deps = activityDeps(services, {
    envFilesRoot,
    client,
    taskQueue,
    securityNotify: opts.securityNotify,
    clock: opts.clock,
    maxOpenRotations: opts.maxOpenRotations,
    messageCommitWaitMs: opts.messageCommitWaitMs,
  });

  let worker: ServiceWorker | undefined;
  let workerRun: Promise<void> | undefined;
  let nativeConnection: NativeConnection | undefined;
  if (opts.worker) {
    nativeConnection = await NativeConnection.connect({ address: temporalAddress });
    worker = await createWorker({
      connection: nativeConnection,
      namespace: 'default',
      taskQueue,
      deps,
      dataConverter: services.dataConverter,
      workflowBundle: { codePath: inject('workflowBundlePath') },
      // In-flight activities are cancelled at once on close, and a worker that has not stopped 10 s
      // later is stopped: close() then fails with that cause instead of waiting for the hook's timeout.
      shutdownGraceMs: 0,
      activityInterceptors: opts.activityInterceptors,
      activitySlots: opts.workerActivitySlots,
    });
    workerRun = worker.run();
  }

  const adminToken = newToken();
  const app = createApp({
    ...services,
    dependentTypes: deps.dependents,
    securityNotify: opts.securityNotify,
    clock: opts.clock,
    client,
    namespace: 'default',
    taskQueue,
    adminToken,
    codecCorsOrigins: ['http://localhost:8233'],
    logger,
    authFailures: opts.authFailures,
  });
  const server = listen(app, 0, '127.0.0.1');
  await once(server, 'listening');
  const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  const secrets: string[] = [];
  const publicValues = new Set<string>();

  /** What the run-wide leak sweep (test/support/sweep.ts) searches once this database and task queue are gone. */
  const leaveForSweep = async () => {
    const runDir = inject('tmpDir');
    registerSecrets(runDir, tag, secrets);
    for (const table of ['audit_log', 'mail_outbox']) {
      recordPlace(runDir, tag, table, JSON.stringify((await superuser.query(`SELECT * FROM ${table}`)).rows));
    }
    try {
      for await (const wf of client.workflow.list({ query: `TaskQueue = '${taskQueue}'` })) {
        const history = await client.workflow.getHandle(wf.workflowId, wf.runId).fetchHistory();
        recordPlace(runDir, tag, 'histories', await decodedHistoryText({ services }, history));
      }
    } catch (err) {
      console.warn(`leak sweep: the histories of ${taskQueue} could not be read: ${(err as Error).message}`);
    }
  };

  const api: Harness['api'] = async (method, route, o = {}) => {
    const headers: Record<string, string> = { ...(o.headers ?? {}) };
    if (o.token) headers.authorization = `Bearer ${o.token}`;
    let body: string | undefined = o.raw;
    if (o.body !== undefined) {
      body = JSON.stringify(o.body);
      headers['content-type'] ??= 'application/json';
    }
    const res = await fetch(url + route, { method, headers, body });
    const text = await res.text();
    if (res.status >= 400) recordPlace(inject('tmpDir'), tag, 'http-errors', `${method} ${route} -> ${res.status} ${text}`);
    let parsed: unknown;
    try {
      parsed = text ? JSON.parse(text) : undefined;
    } catch {
      parsed = undefined;
    }
    return { status: res.status, headers: res.headers, body: parsed, text };
  };

  return {
    url,
    deps,
    envFilesRoot,
    workerEnv: () => ({
      DATABASE_URL: serviceDatabaseUrl,
      TEMPORAL_ADDRESS: temporalAddress,
      SMTP_URL: opts.smtpUrl ?? inject('smtpUrl'),
      TASK_QUEUE: taskQueue,
      VAULT_MASTER_KEY: keyringFile,
      ENV_FILES_ROOT: envFilesRoot,
      DATA_DIR: dir,
      MAIL_FROM: 'mailgent-test@localhost',
      OUTBOUND_ALLOW: TEST_OUTBOUND_ALLOW.join(','),
      // The run's bundle, as the in-process worker uses: a worker process does not bundle its own
      // (seconds of CPU each, dozens of starts a run). start.test's services bundle at start.
      WORKFLOW_BUNDLE: inject('workflowBundlePath'),
      ...(opts.securityNotify ? { SECURITY_NOTIFY: opts.securityNotify.join(',') } : {}),
    }),
    adminToken,
    databaseUrl,
    keyringFile,
    services,
    client,
    taskQueue,
    logFile,
    sql: (text, params) => superuser.query(text, params as unknown[]),
    api,
    // (Eight random bytes: with three, a file's identities met a name taken once in a CI run: 409.)
    async createIdentity(name = `agent-${randomBytes(8).toString('hex')}`, email?: string) {
      const res = await api('POST', '/v1/identities', { token: adminToken, body: { name, ...(email ? { email } : {}) } });
      if (res.status !== 201) throw new Error(`creating identity failed: ${res.status} ${res.text}`);
      secrets.push(res.body.token);
      return { id: res.body.id, token: res.body.token, name };
    },
    secret(value) {
      secrets.push(value);
      return value;
    },
    secrets,
    publicValue(value) {
      publicValues.add(value);
      return value;
    },
    publicValues,
    async close() {
      closing = true;
      server.closeAllConnections();
      await new Promise((resolve) => server.close(resolve));
      // A worker that would not stop is reported once the rest is torn down (its database dropped).
      let workerFailure: unknown;
      if (worker) {
        worker.shutdown();
        try {
          await workerRun;
          await nativeConnection!.close();
        } catch (err) {
          workerFailure = err;
        }
      }
      await leaveForSweep();
      await connection.close();
      await services.close();
      await superuser.end();
      sdkLogsElsewhere();
      await new Promise((resolve) => logStream.end(resolve));
      await dropDatabase(adminUrl, dbName);
      if (workerFailure) throw new Error(`the test worker did not shut down: ${(workerFailure as Error).message}`, { cause: workerFailure });
    },
  };
}

export async function createDatabase(adminUrl: string, name: string, template: string): Promise<void> {
  const admin = new pg.Client({ connectionString: adminUrl });
  await admin.connect();
  try {
    // Two files cloning the template at the same moment make PostgreSQL refuse one; retry it.
    for (let attempt = 0; ; attempt++) {
      try {
        await admin.query(`CREATE DATABASE ${name} TEMPLATE ${template}`);
        return;
      } catch (err) {
        if (attempt >= 20 || !/being accessed by other users/.test((err as Error).message)) throw err;
        await new Promise((r) => setTimeout(r, 100 + Math.random() * 200));
      }
    }
  } finally {
    await admin.end();
  }
}

export async function dropDatabase(adminUrl: string, name: string): Promise<void> {
  const admin = new pg.Client({ connectionString: adminUrl });
  await admin.connect();
  try {
    await admin.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
  } finally {
    await admin.end();
  }
}

type HarnessLogger = ReturnType<typeof createLogger>;

/** The open harnesses' loggers, the newest last: the SDK's logs go to the newest. */
const openLoggers: HarnessLogger[] = [];
let sdkFallback: HarnessLogger | undefined;
let temporalLoggingInstalled = false;

/**
 * The SDK's logs (expected failures included, and every activity's Context.log: its warnings name
 * what failed) go to the log file of the newest harness still open, which its leak check and the
 * run's sweep read; between harnesses, to a file of the run's own. The SDK's logger is installed
 * once per process, and files run one after another in a process: installed with the first
 * harness's logger, every later file's SDK logs went to a stream that file had ended, and were lost
 * unread.
 */
function quietTemporal(logger: HarnessLogger): () => void {
  openLoggers.push(logger);
  if (!temporalLoggingInstalled) {
    temporalLoggingInstalled = true;
    const target = () => {
      const open = openLoggers.at(-1);
      if (open) return open;
      sdkFallback ??= createLogger({ level: 'info', destination: createWriteStream(path.join(inject('tmpDir'), `temporal-sdk-${process.pid}.log`), { flags: 'a' }) });
      return sdkFallback;
    };
    const forward =
      (level: 'error' | 'warn' | 'info' | 'debug') =>
      (obj: object, msg?: string): void =>
        target()[level](obj, msg);
    const forwarding = { error: forward('error'), warn: forward('warn'), info: forward('info'), debug: forward('debug') } as unknown as HarnessLogger;
    try {
      installTemporalLogging(forwarding);
    } catch {
      // Already installed in this process.
    }
  }
  return () => {
    const at = openLoggers.indexOf(logger);
    if (at >= 0) openLoggers.splice(at, 1);
  };
}

function withHost(url: string, host: string): string {
  const u = new URL(url);
  u.host = host;
  return u.toString();
}

/** Reads the harness's own log file (for leak checks). */
export function readLog(h: Harness): string {
  return readFileSync(h.logFile, 'utf8');
}
