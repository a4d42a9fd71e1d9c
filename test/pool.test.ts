import { randomBytes } from 'node:crypto';
import { PG_MIGRATE_LOCK_ID } from 'node-pg-migrate';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import type { Logger } from '../core/logger';
import { migrate, withTransaction } from '../db/pool';
import { withDatabase } from './support/global-setup';
import { createDatabase, dropDatabase } from './support/harness';

/** withTransaction against the run's real PostgreSQL, on a pool whose statements time out client-side (as the vault thread's do). */
describe('withTransaction after a statement timed out', () => {
  // query_timeout alone: the server does not cancel the statement, as when it cannot be reached.
  const pool = new pg.Pool({ connectionString: inject('pgAdminUrl'), max: 1, query_timeout: 300 });
  afterAll(() => pool.end());

  it('closes the client instead of pooling it with its transaction still open', async () => {
    await expect(withTransaction(pool, (tx) => tx.query('SELECT pg_sleep(1)'))).rejects.toThrow('Query read timeout');
    // The statement ran on and its ROLLBACK timed out behind it. Before, the client went back to the
    // pool with its transaction open, and the next caller worked inside it (its now() the old
    // transaction's start, a second before its statement).
    await new Promise((r) => setTimeout(r, 1_200));
    const { rows } = await pool.query('SELECT now() = statement_timestamp() AS fresh');
    expect(rows[0].fresh).toBe(true);
  });
});

/** migrate() on a live database whose pending migration alters a table another session is using. */
describe('a migration that waits for a lock', () => {
  const adminUrl = inject('pgAdminUrl');
  const name = `mailgent_migrate_${randomBytes(4).toString('hex')}`;
  const url = withDatabase(adminUrl, name);
  const patience = { lockTimeoutMs: 300, patienceMs: 2_500, pauseMs: 500 };
  let holder: pg.Client;

  beforeAll(async () => {
    await createDatabase(adminUrl, name, inject('templateDb'));
    // The mail retention migration pending again (its column and index gone, its row too), and every
    // one after it (node-pg-migrate refuses a pending migration before one already run).
    await withClient(url, (c) =>
      c.query(
        `DROP INDEX mail_outbox_unerased; ALTER TABLE mail_outbox DROP COLUMN erased_at; ALTER TABLE rotation_runs DROP COLUMN cancelled_at;
         ALTER TABLE leak_incidents DROP COLUMN left_over; ALTER TABLE mail_outbox DROP COLUMN delivered; DROP TABLE seed_fingerprints_pending;
         DROP TRIGGER rotation_runs_due_at ON rotation_runs; DROP FUNCTION rotation_runs_due_at(); ALTER TABLE rotation_runs DROP COLUMN due_at;
         DROP TRIGGER run_outcomes_close_runs ON run_outcomes; DROP FUNCTION run_outcomes_close_runs(); DROP TRIGGER rotation_runs_open ON rotation_runs; DROP FUNCTION rotation_runs_open();
         ALTER TABLE rotation_runs DROP COLUMN open;
         DELETE FROM schema_migrations WHERE name IN ('1735000000000_mail_retention', '1735100000000_run_cancelled', '1735200000000_incident_left_over', '1735300000000_mail_delivered',
                                                      '1735400000000_seed_fingerprints', '1735500000000_audit_chain_read_committed', '1735600000000_run_due_at',
                                                      '1735700000000_run_open')`,
      ),
    );
    // A session using the table it alters (a pg_dump's, a transaction left open).
    holder = new pg.Client({ connectionString: url });
    await holder.connect();
    await holder.query('BEGIN');
    await holder.query('SELECT count(*) FROM mail_outbox');
  });
  afterAll(async () => {
    await holder.end().catch(() => undefined);
    await dropDatabase(adminUrl, name);
  });

  it('gives up, naming the cause, without stalling the live reads of that table behind it; it applies once the session ends', async () => {
    const warnings: unknown[] = [];
    const logger = { debug: () => undefined, warn: (o: unknown) => warnings.push(o) } as unknown as Logger;
    const migrating = migrate(url, logger, patience);
    const failed = expect(migrating).rejects.toThrow(/^the schema migration waited 3 s for locks another session holds \(a table it alters in use/);
    // While it tries, a read of the table answers: it waits at most one lock_timeout (300 ms) behind the
    // migration's queued lock. Before, it waited as long as the session held the table.
    const altering = `SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock' AND query LIKE '%ALTER TABLE mail_outbox%'`;
    for (const until = Date.now() + 2_000; (await withClient(adminUrl, (c) => c.query(altering, [name]))).rows[0].n === 0; ) {
      if (Date.now() > until) throw new Error('the migration never waited for the table');
      await new Promise((r) => setTimeout(r, 10));
    }
    const started = Date.now();
    await withClient(url, (c) => c.query('SELECT count(*) FROM mail_outbox'));
    expect(Date.now() - started).toBeLessThan(2_000);
    await failed;
    expect(warnings.length).toBeGreaterThan(0);
    expect(await hasColumn()).toBe(false);

    await holder.query('COMMIT');
    await migrate(url, logger, patience);
    expect(await hasColumn()).toBe(true);
  });

  it('waits for another process migrating as long as it takes (its lock blocks no table): the time limit is for tables alone', async () => {
    const other = new pg.Client({ connectionString: url });
    await other.connect();
    try {
      await other.query('SELECT pg_advisory_lock($1)', [PG_MIGRATE_LOCK_ID]);
      let releasedAt = 0;
      const released = new Promise((r) => setTimeout(r, 1_500)).then(() => {
        releasedAt = Date.now();
        return other.query('SELECT pg_advisory_unlock($1)', [PG_MIGRATE_LOCK_ID]);
      });
      // Past its patience (1 s here) behind the other's lock: before, a lock timeout like a table's, and a failed start.
      await migrate(url, undefined, { lockTimeoutMs: 300, patienceMs: 1_000, pauseMs: 200 });
      // It waited for the lock (a migrate that took none would have ended at once, before the release).
      const migratedAt = Date.now();
      await released;
      expect(releasedAt).toBeGreaterThan(0);
      expect(migratedAt).toBeGreaterThanOrEqual(releasedAt);
    } finally {
      await other.end();
    }
  });

  const hasColumn = async () =>
    (await withClient(url, (c) => c.query(`SELECT 1 FROM information_schema.columns WHERE table_name = 'mail_outbox' AND column_name = 'erased_at'`))).rowCount === 1;
});

async function withClient<T>(url: string, fn: (c: pg.Client) => Promise<T>): Promise<T> {
  const c = new pg.Client({ connectionString: url });
  await c.connect();
  try {
    return await fn(c);
  } finally {
    await c.end();
  }
}
