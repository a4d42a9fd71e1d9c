import { createHash, randomUUID } from 'node:crypto';
import { UnprocessableError, ValidationError } from '../core/errors';
import { IDEMPOTENCY_HOURS, purgeExpiredKeys } from '../db/idempotency-keys';
import type { Db } from '../db/pool';
import type { Caller } from '../vault/vault';
import { idempotencyKey } from './schemas';

export { IDEMPOTENCY_HOURS };

/** Expired keys of its identity a keyed request deletes at most (the sweep's retention step takes the rest). */
const PURGE_ON_REQUEST = 1_000;

/**
 * Requests a client may repeat safely by giving an Idempotency-Key (the IETF draft's header; MCP
 * tools take it as `idempotencyKey`): the first request's key is committed with what it made, and a
 * repeat (the same request, by its SHA-256) within IDEMPOTENCY_HOURS is answered with that instead
 * of making it again. Another request under the same key is refused: carrying it out would lose
 * one of the two silently. Keys are per identity and action.
 */
export interface Keyed {
  action: string;
  key: string;
  request: Buffer;
}

export function keyed(action: string, key: string | undefined, request: unknown): Keyed | undefined {
  return key === undefined ? undefined : { action, key, request: createHash('sha256').update(JSON.stringify(request)).digest() };
}

/** What the key's earlier request made (its target id), if the key names one still; a 422 if that request was another. */
async function earlierTarget(db: Db, caller: Caller, k: Keyed): Promise<string | undefined> {
  // The identity's keys honoured no longer go (its own rows, by the primary key's prefix; rows another
  // request holds are left to it), as the sweep's retention step purges every identity's: the table
  // holds about a day of keyed requests. A statement of its own, outside any claim's transaction, so
  // two claims never wait on each other's purge.
  await purgeExpiredKeys(db, PURGE_ON_REQUEST, caller.identityId);
  const { rows } = await db.query(
    `SELECT target_id, request = $4 AS same FROM idempotency_keys
      WHERE identity_id = $1 AND action = $2 AND key = $3 AND created_at > now() - make_interval(hours => $5)`,
    [caller.identityId, k.action, k.key, k.request, IDEMPOTENCY_HOURS],
  );
  const row = rows[0];
  if (!row) return undefined;
  if (!row.same) {
    throw new UnprocessableError(
      `this Idempotency-Key was used within ${IDEMPOTENCY_HOURS} hours for another request (which made ${row.target_id}); nothing was done: use a new key for a new request`,
      'idempotency-key-reused',
      'Idempotency-Key reused for another request',
    );
  }
  return row.target_id as string;
}

/**
 * The answer to a repeat: what the key's earlier request made, as `repeat` answers it (undefined
 * when there is none, or `repeat` finds it gone: the request is then carried out afresh).
 */
export async function repeatOf<T>(db: Db, caller: Caller, k: Keyed | undefined, repeat: (targetId: string) => Promise<T | undefined>): Promise<T | undefined> {
  if (!k) return undefined;
  const target = await earlierTarget(db, caller, k);
  return target === undefined ? undefined : repeat(target);
}

/**
 * Names `targetId` by the key, in the transaction that commits it. False if a request with this key
 * committed since earlierTarget looked (the caller rolls back and answers with that request's
 * target); a key older than IDEMPOTENCY_HOURS is taken over.
 */
export async function claimKey(db: Db, caller: Caller, k: Keyed, targetId: string): Promise<boolean> {
  const { rowCount } = await db.query(
    `INSERT INTO idempotency_keys (identity_id, action, key, target_id, request) VALUES ($1, $2, $3, $4, $5)
     ON CONFLICT (identity_id, action, key) DO UPDATE SET target_id = EXCLUDED.target_id, request = EXCLUDED.request, created_at = now()
       WHERE idempotency_keys.created_at <= now() - make_interval(hours => $6)`,
    [caller.identityId, k.action, k.key, targetId, k.request, IDEMPOTENCY_HOURS],
  );
  return rowCount === 1;
}

/** Thrown inside the transaction that lost the key to another request, to roll it back. */
export class KeyTaken extends Error {
  constructor() {
    super('another request with this Idempotency-Key committed first');
  }
}

/**
 * The Idempotency-Key header (as a string, its quotes are dropped) or the body's idempotencyKey: the
 * same key if both are given, else a 400.
 */
export function idempotencyKeyOf(header: string | undefined, field: string | undefined): string | undefined {
  if (header === undefined) return field;
  const parsed = idempotencyKey.safeParse(header.replace(/^"(.*)"$/, '$1'));
  if (!parsed.success) {
    const message = parsed.error.issues[0]?.message ?? 'is not valid';
    throw new ValidationError(`the Idempotency-Key header ${message}`, [{ path: 'Idempotency-Key', message }]);
  }
  if (field !== undefined && field !== parsed.data) {
    throw new ValidationError("the Idempotency-Key header and the body's idempotencyKey differ: give one", [{ path: 'idempotencyKey', message: 'differs from the Idempotency-Key header' }]);
  }
  return parsed.data;
}

/** Whose keys the admin's are: it acts for no identity. */
export const ADMIN_KEY_OWNER = '00000000-0000-0000-0000-000000000000';

/**
 * For a request whose effect is not one row committed with its key (a leak report: several
 * transactions and Temporal calls), the key is claimed once the request knows what it acts on (its
 * `pinned` part: for a leak report, the credentials and versions it names), and the answer kept with
 * it once answered (keepAnswer). What an earlier request under the key left: its answer (a repeat
 * gets it back), or, none kept (still being carried out, or it failed or died on the way), what it
 * pinned (a repeat acts on that, not on what the request would name now); undefined for a key not
 * claimed; a 422 if the key named another request.
 */
export async function keyedEarlier(db: Db, owner: string, k: Keyed): Promise<{ answer?: unknown; pinned: unknown } | undefined> {
  await purgeExpiredKeys(db, PURGE_ON_REQUEST, owner);
  const { rows } = await db.query(
    `SELECT request = $4 AS same, answer FROM idempotency_keys
      WHERE identity_id = $1 AND action = $2 AND key = $3 AND created_at > now() - make_interval(hours => $5)`,
    [owner, k.action, k.key, k.request, IDEMPOTENCY_HOURS],
  );
  const row = rows[0];
  if (!row) return undefined;
  if (!row.same) {
    throw new UnprocessableError(
      `this Idempotency-Key was used within ${IDEMPOTENCY_HOURS} hours for another request; nothing was done: use a new key for a new request`,
      'idempotency-key-reused',
      'Idempotency-Key reused for another request',
    );
  }
  return { answer: row.answer?.answer, pinned: row.answer?.pinned };
}

/** Claims the key with what the request acts on (keyedEarlier): undefined if claimed; what another request under the key left if it claimed it first. */
export async function claimPinned(db: Db, owner: string, k: Keyed, pinned: unknown): Promise<{ pinned: unknown; answer?: unknown } | undefined> {
  const { rowCount } = await db.query(
    `INSERT INTO idempotency_keys (identity_id, action, key, target_id, request, answer) VALUES ($1, $2, $3, $4, $5, $6)
     ON CONFLICT (identity_id, action, key) DO UPDATE SET target_id = EXCLUDED.target_id, request = EXCLUDED.request, answer = EXCLUDED.answer, created_at = now()
       WHERE idempotency_keys.created_at <= now() - make_interval(hours => $7)`,
    [owner, k.action, k.key, randomUUID(), k.request, JSON.stringify({ pinned }), IDEMPOTENCY_HOURS],
  );
  return rowCount === 1 ? undefined : keyedEarlier(db, owner, k);
}

/** Keeps a request's answer with its key (keyedEarlier), beside what it pinned, unless one is kept already. */
export async function keepAnswer(db: Db, owner: string, k: Keyed, answer: unknown): Promise<void> {
  await db.query(
    `UPDATE idempotency_keys SET answer = answer || jsonb_build_object('answer', $5::jsonb)
      WHERE identity_id = $1 AND action = $2 AND key = $3 AND request = $4 AND NOT answer ? 'answer'`,
    [owner, k.action, k.key, k.request, JSON.stringify(answer)],
  );
}
