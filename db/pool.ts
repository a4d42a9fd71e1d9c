import pg from 'pg';
import { fileURLToPath } from 'node:url';
import { runner } from 'node-pg-migrate';
import type { Logger } from '../core/logger';

export type Pool = pg.Pool;
export type Db = pg.Pool | pg.PoolClient;

export function createPool(connectionString: string, max = 10, logger?: Logger): pg.Pool {
  const pool = new pg.Pool({ connectionString, max, connectionTimeoutMillis: 5_000 });
  // An idle client losing its server must not crash the process; the next query reports it.
  pool.on('error', (err) => logger?.warn({ err }, 'idle database client failed'));
  return pool;
}

/** Runs `fn` in one transaction on one client; rolls back on any error. */
export async function withTransaction<T>(pool: pg.Pool, fn: (client: pg.PoolClient) => Promise<T>): Promise<T> {
  const client = await pool.connect();
  try {
    await client.query('BEGIN');
    const result = await fn(client);
    await client.query('COMMIT');
    return result;
  } catch (err) {
    await client.query('ROLLBACK').catch(() => undefined);
    throw err;
  } finally {
    client.release();
  }
}

const MIGRATIONS_DIR = fileURLToPath(new URL('./migrations', import.meta.url));

/** Brings the schema up to date; concurrent callers wait on node-pg-migrate's advisory lock. */
export async function migrate(connectionString: string, logger?: Logger): Promise<void> {
  const client = new pg.Client({ connectionString });
  await client.connect();
  try {
    await runner({
      dbClient: client,
      dir: MIGRATIONS_DIR,
      direction: 'up',
      migrationsTable: 'schema_migrations',
      singleTransaction: true,
      advisoryLockMode: 'wait',
      log: (message: string) => logger?.debug({ migration: message }, 'migration'),
    });
  } finally {
    await client.end();
  }
}
