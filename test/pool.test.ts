import pg from 'pg';
import { afterAll, describe, expect, inject, it } from 'vitest';
import { withTransaction } from '../db/pool';

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
