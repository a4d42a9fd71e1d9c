import type { Db, Pool } from '../db/pool';
import { UnprocessableError } from '../core/errors';
import { audited } from './audited';
import type { Caller } from './types';

/** An identity's password policy: maximum age, minimum length, required character classes. */
export interface PasswordPolicy {
  maxAgeDays: number;
  length: number;
  lowercase: boolean;
  uppercase: boolean;
  digits: boolean;
  symbols: boolean;
  escalateAfterDays: number;
}

export async function getPasswordPolicy(db: Db, identityId: string): Promise<PasswordPolicy | undefined> {
  const r = (await db.query('SELECT * FROM password_policies WHERE identity_id = $1', [identityId])).rows[0];
  return r
    ? { maxAgeDays: r.max_age_days, length: r.length, lowercase: r.lowercase, uppercase: r.uppercase, digits: r.digits, symbols: r.symbols, escalateAfterDays: r.escalate_after_days }
    : undefined;
}

export function setPasswordPolicy(pool: Pool, caller: Caller, p: PasswordPolicy): Promise<PasswordPolicy> {
  return audited(pool, caller, 'password_policy.set', { ...p }, async (tx) => {
    await tx.query(
      `INSERT INTO password_policies (identity_id, max_age_days, length, lowercase, uppercase, digits, symbols, escalate_after_days, updated_at)
       VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now())
       ON CONFLICT (identity_id) DO UPDATE SET max_age_days = $2, length = $3, lowercase = $4, uppercase = $5, digits = $6,
         symbols = $7, escalate_after_days = $8, updated_at = now()`,
      [caller.identityId, p.maxAgeDays, p.length, p.lowercase, p.uppercase, p.digits, p.symbols, p.escalateAfterDays],
    );
    return p;
  });
}

/** Refuses a password that breaks the policy; the message says what is missing, never the value. */
export function checkPassword(value: string, p: PasswordPolicy): void {
  const missing = [
    value.length < p.length && `at least ${p.length} characters`,
    p.lowercase && !/[a-z]/.test(value) && 'a lower-case letter',
    p.uppercase && !/[A-Z]/.test(value) && 'an upper-case letter',
    p.digits && !/[0-9]/.test(value) && 'a digit',
    p.symbols && !/[^A-Za-z0-9]/.test(value) && 'a symbol',
  ].filter(Boolean);
  if (missing.length) throw new UnprocessableError(`the password does not meet this identity's password policy: it needs ${missing.join(', ')}`);
}
