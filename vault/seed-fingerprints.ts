import type { Logger } from '../core/logger';
import { withTransaction, type Pool } from '../db/pool';
import type { SecretStore } from './secret-store';

/** Versions fingerprinted again per transaction. */
const BATCH = 200;

/**
 * Fingerprints again the TOTP seed versions stored before a seed's fingerprint was of its base32
 * seed (the migration 1735400000000_seed_fingerprints lists them): each is opened and its
 * fingerprint set as a version stored now gets it (SecretStore.versionFingerprint). Until then a
 * seed pasted where a name goes, or reported leaked by its SHA-256, was not found. Runs as the
 * services start, once: each batch takes its rows off the list in the transaction that sets them
 * (SKIP LOCKED, so services starting together share the work). A version that cannot be opened (a
 * key that fails its integrity check) keeps its old fingerprint, named in a warning. How many were set.
 */
export async function refingerprintSeeds(pool: Pool, secrets: Pick<SecretStore, 'open' | 'versionFingerprint'>, logger?: Pick<Logger, 'warn'>): Promise<number> {
  let set = 0;
  for (;;) {
    const taken = await withTransaction(pool, async (tx) => {
      const taken = await tx.query(
        `DELETE FROM seed_fingerprints_pending p
          WHERE (p.credential_id, p.version) IN (SELECT credential_id, version FROM seed_fingerprints_pending LIMIT $1 FOR UPDATE SKIP LOCKED)
         RETURNING p.credential_id, p.version`,
        [BATCH],
      );
      if (taken.rowCount === 0) return 0;
      // (A version destroyed since has no row left: nothing to set.)
      const { rows } = await tx.query(
        `SELECT v.credential_id, v.version, v.data_key_id, v.sealed, c.identity_id, c.name
           FROM unnest($1::uuid[], $2::int[]) AS t(credential_id, version)
           JOIN secret_versions v ON v.credential_id = t.credential_id AND v.version = t.version JOIN credentials c ON c.id = t.credential_id`,
        [taken.rows.map((r) => r.credential_id), taken.rows.map((r) => r.version)],
      );
      for (const row of rows) {
        let fingerprint: Buffer;
        try {
          fingerprint = await secrets.versionFingerprint(tx, await secrets.open(tx, row.identity_id, row.credential_id, row.name, row));
        } catch (err) {
          logger?.warn({ credentialId: row.credential_id, version: row.version, error: (err as Error).name }, 'a TOTP seed version could not be opened to fingerprint its seed; it keeps its old fingerprint');
          continue;
        }
        await tx.query('UPDATE secret_versions SET fingerprint = $3 WHERE credential_id = $1 AND version = $2', [row.credential_id, row.version, fingerprint]);
        set += 1;
      }
      return taken.rowCount ?? 0;
    });
    if (taken === 0) return set;
  }
}
