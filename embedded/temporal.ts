import { lstatSync, mkdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import path from 'node:path';
import { Connection } from '@temporalio/client';
import { HelperInterrupted } from '../core/helper-interrupted';
import type { Logger } from '../core/logger';
import { startChild, startTimeOf, stillRunning, waitUntilReady } from './child';
import { freePort, withFreshPorts } from './ports';
import { serverEnv } from './postgres';
import { breakStale, createLock, type LockState, readLock } from '../core/lock-file';
import { cacheDir, findTemporalCli } from './temporal-cli';

/**
 * The Temporal dev server with its state in a SQLite file under DATA_DIR, so workflows survive a
 * restart. Falls back to the SDK's own download of the same server when no CLI can be found or built.
 */
export interface EmbeddedTemporal {
  address: string;
  /** SIGTERM by default (SIGKILL after 20 s); the fault suite kills it outright. */
  stop(signal?: NodeJS.Signals): Promise<void>;
  /** Resolves with the server's exit code when it exits (stopped, or died); absent for the SDK's in-process fallback. */
  exited?: Promise<number | null>;
}

export async function startEmbeddedTemporal(opts: {
  dataDir: string;
  namespace: string;
  cliPath?: string;
  logger?: Logger;
  /** The frontend port; a free one by default (a restart on the same file can reuse the old one). */
  port?: number;
}): Promise<EmbeddedTemporal> {
  mkdirSync(opts.dataDir, { recursive: true });
  const dbFile = path.join(opts.dataDir, 'temporal.sqlite');
  const release = await claimTemporalFile(opts.dataDir);
  try {
    const started = await startOn(opts, dbFile);
    return { address: started.address, stop: (signal) => started.stop(signal).finally(release), exited: started.exited };
  } catch (err) {
    release();
    throw err;
  }
}

/**
 * One Temporal server per SQLite file: two would both own its shards and fight over them. The
 * process that starts one records its pid and start time in DATA_DIR/temporal.lock until it stops
 * it; another process finding that process alive is refused (a dead one's lock is stale and taken
 * over). The start time tells the owner from another process given its pid since (the lock of one
 * killed, or of a machine since restarted, named whatever process had the pid now: start-up was
 * refused until the lock was removed by hand). A lock of the pid alone (written before) is the pid's.
 *
 * Two processes starting at once: the lock appears with its content (written aside, then linked
 * into place: core/lock-file.ts's createLock), never empty, so the other reads who holds it (before,
 * it could read the file between its creation and its write, take it for stale and claim it too).
 * One found empty (a writer without hard links between the two, or one that died there) is read
 * again for up to a second before it counts as stale. A stale lock is removed by one process at a time
 * (`breakStale`: only if it is still the lock judged stale), and a stop removes the lock only while
 * it is still its own.
 */
async function claimTemporalFile(dataDir: string): Promise<() => void> {
  const lock = path.join(dataDir, 'temporal.lock');
  const mine = [process.pid, startTimeOf(process.pid)].filter((part) => part !== undefined).join(' ');
  const release = () => {
    if (readIfThere(lock) === mine) rmSync(lock, { force: true });
  };
  for (let attempt = 0; attempt < 20; attempt++) {
    const made = await createLock(lock, mine);
    if (made) {
      await made.close();
      return release;
    }
    const held = await settledLock(lock);
    if (held === undefined) continue; // removed meanwhile
    if (held.content === mine) return release; // this process's own
    const [pid, started] = held.content.split(/\s+/);
    const owner = Number(pid);
    // This pid with another start time (or none) is a process before this one: before, taken for this
    // process's own and left as it was, so others read it as stale and could take it over.
    if (owner !== process.pid && owner > 0 && stillRunning(owner, started)) {
      throw new Error(
        `the embedded Temporal server of ${dataDir} is run by another Mailgent process (pid ${owner}); ` +
          'give this one TEMPORAL_ADDRESS (that server\'s address, in its log) or a DATA_DIR of its own',
      );
    }
    // A break another starter holds is left to it: the lock is looked at again a moment later.
    if (!(await breakStale(lock, held, notALock))) await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`could not claim ${lock}: another process was taking over its stale lock all along (${lock}.break); start again`);
}

/** The lock's state, read again while it is empty (for up to a second: its writer may be between creating and writing it); undefined once it is gone. */
async function settledLock(file: string): Promise<LockState | undefined> {
  const deadline = Date.now() + 1_000;
  for (;;) {
    const held = await readLock(file, notALock);
    if (held?.content !== '' || Date.now() >= deadline) return held;
    await new Promise((r) => setTimeout(r, 50));
  }
}

function notALock(file: string): Error {
  return new Error(`${file} is not a lock file (a link, a directory or something larger is at its name): remove it`);
}

function readIfThere(file: string): string | undefined {
  try {
    return readFileSync(file, 'utf8').trim();
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
}

async function startOn(
  opts: { dataDir: string; namespace: string; cliPath?: string; logger?: Logger; port?: number },
  dbFile: string,
): Promise<EmbeddedTemporal> {
  let buildError: Error | undefined;
  const binary = await findTemporalCli({ configured: opts.cliPath, logger: opts.logger }).catch((err: Error) => {
    // A build Ctrl-C ended is start-up interrupted, not a reason to download the server instead.
    if (err instanceof HelperInterrupted) throw err;
    buildError = err;
    return undefined;
  });
  if (!binary) return startWithSdkDownload({ ...opts, dbFile, port: opts.port ?? (await freePort()), buildError });

  return withFreshPorts(async () => {
    const port = opts.port ?? (await freePort());
    const args = ['server', 'start-dev', '--headless', '--ip', '127.0.0.1', '--port', String(port), '--http-port', String(await freePort()),
      '--metrics-port', String(await freePort()), '--db-filename', dbFile, '--namespace', opts.namespace, '--log-level', 'warn', ...TUNING];
    const child = startChild(binary, args, { logFile: path.join(opts.dataDir, 'logs', 'temporal.log'), deathSignal: 'TERM', env: temporalEnv() });
    const address = `127.0.0.1:${port}`;
    await waitUntilReady(child, `Temporal dev server (${binary})`, () => probe(address, opts.namespace), 90_000);
    opts.logger?.info({ address, dbFile }, 'embedded Temporal ready');
    return { address, stop: (signal: NodeJS.Signals = 'SIGTERM') => child.stop(signal, 20_000), exited: child.exited };
  });
}

/**
 * The dev server's environment: PostgreSQL's (serverEnv) and HOME, where the CLI looks for its
 * configuration. Not the service's: an inline VAULT_MASTER_KEY, ADMIN_TOKEN and the passwords in
 * DATABASE_URL and SMTP_URL went into a third-party process and whatever it runs (before; the
 * embedded PostgreSQL was given only what it needs already).
 */
export function temporalEnv(): NodeJS.ProcessEnv {
  return { ...serverEnv(), ...(process.env.HOME ? { HOME: process.env.HOME } : {}) };
}

/**
 * What the dev server's defaults leave on the table (measured with 300 rotations on 2 cores: 4.6 →
 * 10 rotations/s, the server's CPU per rotation 167 → 73 ms):
 * - SQLite in WAL mode with `synchronous=normal` instead of a rollback journal synced on every
 *   commit. A commit is in the WAL before the server acknowledges it, so killing or restarting the
 *   server loses nothing (the fault suite does both); only an OS crash or power cut can drop the
 *   last commits, which a development server may accept. Production runs Temporal on PostgreSQL.
 * - Eager activity dispatch: the worker that completes a workflow task gets the activity it just
 *   scheduled in the reply instead of through another poll. The SDK asks for it by default; the
 *   server's default is off. The compose file's dynamic config turns it on too.
 */
const TUNING = [
  '--sqlite-pragma', 'journal_mode=wal',
  '--sqlite-pragma', 'synchronous=normal',
  '--dynamic-config-value', 'system.enableActivityEagerExecution=true',
];

/** Ready means the frontend answers and the namespace exists. */
async function probe(address: string, namespace: string): Promise<void> {
  const connection = await Connection.connect({ address, connectTimeout: 1_000 });
  try {
    await connection.workflowService.describeNamespace({ namespace });
  } finally {
    await connection.close();
  }
}

async function startWithSdkDownload(opts: { dbFile: string; port: number; namespace: string; logger?: Logger; buildError?: Error }): Promise<EmbeddedTemporal> {
  opts.logger?.warn({ reason: opts.buildError?.message ?? 'no temporal CLI and no Go toolchain' }, 'falling back to the Temporal SDK download of the dev server');
  const { TestWorkflowEnvironment } = await import('@temporalio/testing');
  try {
    const env = await TestWorkflowEnvironment.createLocal({
      server: {
        // The SDK's default is the shared temporary directory, where whatever file sits at its
        // predictable name, under a day old, is run as the service, unchecked.
        executable: { type: 'cached-download', downloadDir: privateDir(path.join(cacheDir(), 'sdk-download')) },
        ip: '127.0.0.1',
        port: opts.port,
        dbFilename: opts.dbFile,
        namespace: opts.namespace,
        extraArgs: ['--headless', ...TUNING],
      },
    });
    return { address: env.address, stop: () => env.teardown() };
  } catch (err) {
    throw new Error(
      'No Temporal server could be started. Set TEMPORAL_ADDRESS to use an external server, set TEMPORAL_CLI_PATH, ' +
        `or install Go so the CLI can be built. ${opts.buildError ? `Building failed: ${opts.buildError.message}. ` : ''}` +
        `The SDK download failed: ${(err as Error).message}`,
      { cause: err },
    );
  }
}

/**
 * `dir`, made 0700 if missing; refused unless it is a directory of this user's that no one else can
 * write to, under directories that only this user or root can change (or sticky ones, as /tmp is):
 * another user able to rename it could put a directory of theirs in its place after the check.
 */
function privateDir(dir: string): string {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const uid = process.getuid?.();
  const stat = lstatSync(dir);
  const refuse = (why: string) => new Error(`${dir} ${why} (the Temporal server is downloaded there and run)`);
  if (!stat.isDirectory() || (uid !== undefined && stat.uid !== uid) || (stat.mode & 0o022) !== 0) throw refuse("must be a directory of this user's that no one else can write to");
  for (let parent = path.dirname(path.resolve(dir)); ; parent = path.dirname(parent)) {
    const up = statSync(parent);
    const othersWrite = (up.mode & 0o022) !== 0 && (up.mode & 0o1000) === 0;
    if ((uid !== undefined && up.uid !== uid && up.uid !== 0) || othersWrite) throw refuse(`is inside ${parent}, which another user can change`);
    if (parent === path.dirname(parent)) return dir;
  }
}
