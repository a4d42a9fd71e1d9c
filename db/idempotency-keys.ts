import type { Db } from './pool';

/** How long an Idempotency-Key names what its request made: a repeat within this time gets that back. */
export const IDEMPOTENCY_HOURS = 24;

/**
 * Deletes keys past their time, at most `limit` of them (rows a request holds are skipped): the
 * sweep's retention step, for every identity; an identity's own keyed request purges its own first
 * (api/idempotency.ts). How many went.
 */
export async function purgeExpiredKeys(db: Db, limit: number, identityId?: string): Promise<number> {
  const { rowCount } = await db.query(
    `DELETE FROM idempotency_keys WHERE ctid IN (
       SELECT ctid FROM idempotency_keys
        WHERE created_at <= now() - make_interval(hours => $1) AND ($2::uuid IS NULL OR identity_id = $2)
        LIMIT $3 FOR UPDATE SKIP LOCKED)`,
    [IDEMPOTENCY_HOURS, identityId ?? null, limit],
  );
  return rowCount ?? 0;
}
