import type { Db, Pool } from '../db/pool';
import { isCommitUnconfirmed, withTransaction } from '../db/pool';
import { unconfirmedChange } from '../core/errors';
import { appendAudit, auditFailure, callerEntry } from './audit';
import type { Caller } from './types';

/** What the action learns while it runs and wants in its audit row. */
export interface AuditNote {
  credentialId: string | null;
  detail: Record<string, unknown>;
}

/**
 * Runs `fn` in one transaction whose last statement is its audit row. If anything fails the
 * transaction is rolled back and the failure is audited on its own, with its outcome. If the audit
 * row itself cannot be written, the action is rolled back and fails with a 503: nothing it read
 * (a secret above all) leaves unaudited.
 */
export async function audited<T>(
  pool: Pool,
  caller: Caller,
  action: string,
  detail: Record<string, unknown>,
  fn: (tx: Db, note: AuditNote) => Promise<T>,
  /** What a caller is told when the COMMIT fails (the action may have been done): how to find out before trying again. */
  unconfirmed = `the ${action} could not be confirmed: it may have been committed before the database connection failed; check its result before trying again`,
): Promise<T> {
  const note: AuditNote = { credentialId: null, detail: { ...detail } };
  const base = () => callerEntry(caller, action, note.detail, note.credentialId);
  try {
    return await withTransaction(pool, async (tx) => {
      const result = await fn(tx, note);
      await appendAudit(tx, { ...base(), outcome: 'ok' });
      return result;
    });
  } catch (caught) {
    // A failed COMMIT is not "try again": the action and its ok row may be durable.
    const err = isCommitUnconfirmed(caught) ? unconfirmedChange(unconfirmed) : caught;
    // If the failure cannot be audited either, the API tries once more to audit it.
    throw await auditFailure(pool, { ...base(), detail: { ...note.detail, ...(err !== caught ? { unconfirmed: true } : {}) } }, err);
  }
}
