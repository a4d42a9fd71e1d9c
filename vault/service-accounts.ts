import type { Pool } from '../db/pool';
import { lastReadSql } from './audit';

/**
 * Service-account inventory: kind service_account with owners, dependents, age and the last read
 * as the audit log records it; orphans are those with no dependents and no recent read.
 */
const DAY_MS = 86_400_000;

export interface ServiceAccountRow {
  id: string;
  identityId: string;
  name: string;
  owners: string[];
  service: string | null;
  dependents: { type: string }[];
  ageDays: number;
  lastReadAt: string | null;
  nextRotationAt: string | null;
}

/** Service accounts with their last read taken from the audit log. */
export async function listServiceAccounts(pool: Pool, opts: { identityId?: string; asOf: Date }): Promise<ServiceAccountRow[]> {
  const { rows } = await pool.query(
    `SELECT c.id, c.identity_id, c.name, c.owners, c.service, c.dependents, c.next_rotation_at, v.created_at,
            ${lastReadSql('c.id')} AS last_read
       FROM credentials c JOIN secret_versions v ON v.credential_id = c.id AND v.version = c.current_version
      WHERE c.kind = 'service_account' AND c.deleted_at IS NULL AND ($1::uuid IS NULL OR c.identity_id = $1)
      ORDER BY c.name`,
    [opts.identityId ?? null],
  );
  return rows.map((r) => ({
    id: r.id,
    identityId: r.identity_id,
    name: r.name,
    owners: r.owners,
    service: r.service,
    dependents: r.dependents,
    ageDays: Math.max(0, Math.floor((opts.asOf.getTime() - r.created_at.getTime()) / DAY_MS)),
    lastReadAt: r.last_read ? r.last_read.toISOString() : null,
    nextRotationAt: r.next_rotation_at ? r.next_rotation_at.toISOString() : null,
  }));
}

/** Orphans: no dependents, and no read in the last `days` (never-read accounts count from their creation). */
export async function findOrphans(pool: Pool, opts: { identityId?: string; asOf: Date; days: number }): Promise<ServiceAccountRow[]> {
  const cutoff = opts.asOf.getTime() - opts.days * DAY_MS;
  const accounts = await listServiceAccounts(pool, opts);
  return accounts.filter(
    (a) => a.dependents.length === 0 && (a.lastReadAt ? Date.parse(a.lastReadAt) < cutoff : opts.asOf.getTime() - a.ageDays * DAY_MS <= cutoff),
  );
}
