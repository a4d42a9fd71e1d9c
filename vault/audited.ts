import type { Db, Pool } from '../db/pool';
import { isCommitUnconfirmed, withTransaction } from '../db/pool';
import { unconfirmedChange } from '../core/errors';
import { appendAudit, auditFailure, callerEntry } from './audit';
import type { Caller } from './types';
import { UNCHECKED, withhold } from './withheld';

/** What the action learns while it runs and wants in its audit row. */
export interface AuditNote {
  credentialId: string | null;
  detail: Record<string, unknown>;
  /**
   * The fields of `detail` that hold what the caller gave to name a credential (`name`, `ref`) and
   * have not been checked yet: until the lookup finds its credential, or has asked whether the
   * reference is a value the caller can read (vault/withheld.ts), a failure row withholds them,
   * unchecked, rather than write a value pasted where a name goes as given.
   */
  unchecked: Set<string>;
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
  /** The fields of `detail` that are the caller's reference to a credential, not yet checked (AuditNote.unchecked). */
  refs: readonly string[] = [],
): Promise<T> {
  const note: AuditNote = { credentialId: null, detail: { ...detail }, unchecked: new Set(refs) };
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
    const failed = { ...note.detail, ...(err !== caught ? { unconfirmed: true } : {}) };
    // A reference the lookup never got to check (its statement failed: a timeout, a dropped connection) is not written as given.
    for (const field of note.unchecked) if (field in failed) withhold(failed, field, UNCHECKED);
    // If the failure cannot be audited either, the API tries once more to audit it.
    throw await auditFailure(pool, { ...base(), detail: failed }, err);
  }
}
