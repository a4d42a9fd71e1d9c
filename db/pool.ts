import pg from 'pg';
import { fileURLToPath } from 'node:url';
import type { Logger } from '../core/logger';

export type Pool = pg.Pool;
export type Db = pg.Pool | pg.PoolClient;

/** Where the pool reports connections it lost (a pino logger, or the read thread's relay to one). */
export interface PoolLogger {
  warn(obj: { err: unknown }, msg: string): void;
}

/**
 * `queryTimeoutMs`: how long a statement may go unanswered before it fails: a server that stops
 * answering with the connection open (a blackholed network, a stalled disk) otherwise holds the
 * statement, and whatever waits on it, forever. The connection is then closed (pool.query does so;
 * withTransaction too, its ROLLBACK failing behind the statement), and a server still answering
 * cancels the statement itself a second sooner (statement_timeout), so its transaction rolls back.
 * Unset: no limit (rekey's and the bench's own pools). The services' pool, the API's and the worker's,
 * has one (core/services.ts, SERVICES_QUERY_TIMEOUT_MS): their statements are each short, a sweep's
 * in pages.
 */
export function createPool(connectionString: string, max = 10, logger?: PoolLogger, opts: { queryTimeoutMs?: number } = {}): pg.Pool {
  const timeouts = opts.queryTimeoutMs ? { query_timeout: opts.queryTimeoutMs, statement_timeout: Math.max(opts.queryTimeoutMs - 1_000, 1) } : {};
  // READ COMMITTED whatever the database's default: the audit chain's trigger reads its head under
  // the chain lock, which a REPEATABLE READ snapshot taken before the lock would hide (it refuses one).
  const pool = new pg.Pool({ connectionString, max, connectionTimeoutMillis: 5_000, options: '-c default_transaction_isolation=read\\ committed', ...timeouts });
  // An idle client losing its server must not crash the process; the next query reports it.
  pool.on('error', (err) => logger?.warn({ err }, 'idle database client failed'));
  // Nor a checked-out client losing it between two statements (nobody else listens then): its next query fails instead.
  pool.on('connect', (client) => client.on('error', (err) => logger?.warn({ err }, 'database connection lost')));
  return pool;
}

// Network errors, PostgreSQL's admin shutdown / cannot-connect-now / connection-exception classes and
// too_many_connections, and a statement cancelled (57014: its statement_timeout, when the server
// answers but too slowly, a lock held past it; or a cancel by an operator): nothing was done, try again.
const UNAVAILABLE_CODES = new Set([
  'ECONNREFUSED', 'ECONNRESET', 'ETIMEDOUT', 'EPIPE', 'EHOSTUNREACH', 'ENETUNREACH', 'ENOTFOUND', 'EAI_AGAIN',
  '57014', '57P01', '57P02', '57P03', '53300', '08000', '08001', '08003', '08004', '08006',
]);
// node-postgres reports a dropped or unreachable server with these messages and no code (and a
// statement unanswered past a pool's queryTimeoutMs with "Query read timeout").
const UNAVAILABLE_MESSAGE = /Connection terminated|not queryable|timeout exceeded when trying to connect|connect ECONNREFUSED|Connection refused|Query read timeout/i;

/** The database could not be reached or dropped the connection: worth trying again shortly, not a bug. */
export function isDatabaseUnavailable(err: unknown): boolean {
  const e = err as { code?: string; message?: string } | undefined;
  return Boolean(e?.code && UNAVAILABLE_CODES.has(e.code)) || UNAVAILABLE_MESSAGE.test(e?.message ?? '');
}

/**
 * Runs `fn`, and again while it fails as `isOutage` says (the database unreachable, by default),
 * pausing 0.5 s, then twice as long each time up to 4 s (with `wait`: an activity's own sleep wakes
 * at its cancellation), for at most `limitMs`: work that must not be lost to a brief outage, and
 * that is safe to run again.
 */
export async function outlastingOutages<T>(
  fn: () => Promise<T>,
  limitMs: number,
  isOutage: (err: unknown) => boolean = isDatabaseUnavailable,
  wait: (ms: number) => Promise<void> = (ms) => new Promise((resolve) => setTimeout(resolve, ms)),
): Promise<T> {
  const deadline = Date.now() + limitMs;
  for (let pause = 500; ; pause = Math.min(pause * 2, 4_000)) {
    try {
      return await fn();
    } catch (err) {
      if (!isOutage(err) || Date.now() + pause > deadline) throw err;
      await wait(pause);
    }
  }
}

/**
 * Set on the error of a COMMIT that failed: the transaction may be durable (only its answer lost
 * with the connection) or not. Unlike any other failure in it, trying again may do it twice.
 */
const COMMIT_UNCONFIRMED = Symbol('commit unconfirmed');

export function isCommitUnconfirmed(err: unknown): boolean {
  return typeof err === 'object' && err !== null && COMMIT_UNCONFIRMED in err;
}

/** Runs `fn` in one transaction on one client; rolls back on any error. */
export async function withTransaction<T>(pool: pg.Pool, fn: (client: pg.PoolClient) => Promise<T>): Promise<T> {
  const client = await pool.connect();
  // A client whose ROLLBACK failed is closed, not pooled: its transaction may still be open (a
  // statement past queryTimeoutMs runs on, and the ROLLBACK queued behind it timed out too), and
  // the next caller would work inside it, reading rows not committed and committing its work.
  let broken: Error | undefined;
  try {
    await client.query('BEGIN');
    const result = await fn(client);
    try {
      await client.query('COMMIT');
    } catch (err) {
      throw typeof err === 'object' && err !== null ? Object.assign(err, { [COMMIT_UNCONFIRMED]: true }) : err;
    }
    return result;
  } catch (err) {
    await client.query('ROLLBACK').catch((rollbackErr: Error) => (broken = rollbackErr));
    throw err;
  } finally {
    client.release(broken);
  }
}

const MIGRATIONS_DIR = fileURLToPath(new URL('./migrations', import.meta.url));

/** How a migration waits for the locks it needs (tests shorten these). */
export interface MigrationPatience {
  /** The longest one attempt waits for a lock (lock_timeout): the reads and writes queued behind its wait wait no longer. */
  lockTimeoutMs?: number;
  /** How long the attempts go on before the start-up fails, naming the cause. */
  patienceMs?: number;
  /** The pause between attempts, in which what queued behind the last one goes through. */
  pauseMs?: number;
}

/**
 * Brings the schema up to date; concurrent callers wait on node-pg-migrate's advisory lock. A
 * migration that alters a table waits for every session using it (a pg_dump, a transaction left
 * open), and every later statement on the table queues behind that wait: a live service's reads
 * and writes stalled for as long as the dump ran, and this start-up hung without a word. Each
 * attempt waits at most `lockTimeoutMs` for a table's lock, then rolls back, lets the queue
 * through and tries again, for `patienceMs` in all.
 */
export async function migrate(connectionString: string, logger?: Logger, patience: MigrationPatience = {}): Promise<void> {
  // Loaded here, not at the top: only migrating processes need it (not the API's read thread).
  const { runner, PG_MIGRATE_LOCK_ID } = await import('node-pg-migrate');
  const { lockTimeoutMs = 3_000, patienceMs = 120_000, pauseMs = 2_000 } = patience;
  const deadline = Date.now() + patienceMs;
  for (let attempt = 1; ; attempt++) {
    const client = new pg.Client({ connectionString, connectionTimeoutMillis: 10_000 });
    client.on('error', () => undefined);
    await client.connect();
    try {
      // Another process migrating is waited for as long as it takes (its lock blocks no table), as
      // before: the time limit is for the tables' locks alone, taken after this one.
      await client.query('SELECT pg_advisory_lock($1)', [PG_MIGRATE_LOCK_ID]);
      await client.query(`SET lock_timeout = ${Math.max(1, Math.round(lockTimeoutMs))}`);
      await runner({
        dbClient: client,
        dir: MIGRATIONS_DIR,
        direction: 'up',
        migrationsTable: 'schema_migrations',
        singleTransaction: true,
        noLock: true,
        log: (message: string) => logger?.debug({ migration: message }, 'migration'),
      });
      return;
    } catch (err) {
      if ((err as { code?: string }).code !== '55P03') throw err;
      if (Date.now() + pauseMs >= deadline) {
        throw new Error(
          `the schema migration waited ${Math.round(patienceMs / 1000)} s for locks another session holds (a table it alters in use: a pg_dump, ` +
            'a transaction left open); end that session (see pg_stat_activity) and start again',
          { cause: err },
        );
      }
      logger?.warn({ attempt }, 'the schema migration waits for a lock another session holds (a table it alters is in use); trying again shortly');
      await new Promise((resolve) => setTimeout(resolve, pauseMs));
    } finally {
      await client.end().catch(() => undefined);
    }
  }
}
