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
  return (await accountRows(pool, opts)).map(({ credentialCreatedAt: _created, ...row }) => row);
}

/** The accounts, each with its credential's own creation (not its current value's): what "never read for N days" counts from. */
async function accountRows(pool: Pool, opts: { identityId?: string; asOf: Date }): Promise<(ServiceAccountRow & { credentialCreatedAt: Date })[]> {
  const { rows } = await pool.query(
    `SELECT c.id, c.identity_id, c.name, c.owners, c.service, c.dependents, c.next_rotation_at, v.created_at, c.created_at AS credential_created_at,
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
    credentialCreatedAt: r.credential_created_at,
  }));
}

/**
 * Orphans: no dependents, and no read in the last `days`. A never-read account counts from the
 * credential's creation, not its current value's: one rotated (or stored again) every month was
 * never old enough before, though nobody had ever read it.
 */
export async function findOrphans(pool: Pool, opts: { identityId?: string; asOf: Date; days: number }): Promise<ServiceAccountRow[]> {
  const cutoff = opts.asOf.getTime() - opts.days * DAY_MS;
  const accounts = await accountRows(pool, opts);
  return accounts
    .filter((a) => a.dependents.length === 0 && (a.lastReadAt ? Date.parse(a.lastReadAt) : a.credentialCreatedAt.getTime()) < cutoff)
    .map(({ credentialCreatedAt: _created, ...row }) => row);
}
