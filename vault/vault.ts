import { randomUUID } from 'node:crypto';
import type { Db, Pool } from '../db/pool';
import { withTransaction } from '../db/pool';
import { NotFoundError, UnprocessableError, VersionConflictError } from '../core/errors';
import { appendAudit, errorDetail, markAudited, outcomeOf } from './audit';
import { open, seal, versionAad } from './crypto';
import type { DataKeys } from './data-keys';
import { normalizeTotp, parseStoredTotp, toOtpauthUri, totpCode, type TotpCode, type TotpInput } from './totp';

/**
 * The vault: the only code that sees plaintext. Every call runs in one transaction with its
 * audit row; a call that fails is rolled back and audited on its own with its outcome.
 */

export const KINDS = ['api_key', 'password', 'token', 'totp_seed', 'service_account', 'generic'] as const;
export type Kind = (typeof KINDS)[number];
export type VersionLabel = 'current' | 'previous' | 'pending' | null;

/** Who is acting, for scoping and for the audit row. */
export interface Caller {
  identityId: string;
  actor: string;
  requestId?: string;
}

export type CredentialRef = { id: string } | { name: string };

export interface RotationPolicy {
  provider: string;
  settings: Record<string, unknown>;
  periodDays: number;
}

export interface StoreInput {
  name: string;
  kind: Kind;
  value?: string;
  totp?: TotpInput;
  metadata?: Record<string, unknown>;
  owners?: string[];
  rotation?: RotationPolicy | null;
  expiresAt?: string | null;
  expectedVersion?: number;
}

export interface StoredVersion {
  id: string;
  name: string;
  version: number;
  createdAt: string;
}

export interface SecretRead {
  id: string;
  name: string;
  kind: Kind;
  version: number;
  label: VersionLabel;
  value: string;
  createdAt: string;
  ageDays: number;
}

export interface CredentialMeta {
  id: string;
  name: string;
  kind: Kind;
  version: number;
  previousVersion: number | null;
  pendingVersion: number | null;
  ageDays: number;
  createdAt: string;
  versionCreatedAt: string;
  metadata: Record<string, unknown>;
  owners: string[];
  policy: RotationPolicy | null;
  nextRotationAt: string | null;
  expiresAt: string | null;
  lastAccessedAt: string | null;
  status: string;
}

export interface ListFilter {
  kind?: Kind;
  olderThanDays?: number;
  dueWithinDays?: number;
  after?: string;
  limit: number;
}

interface AuditNote {
  credentialId: string | null;
  detail: Record<string, unknown>;
}

const DAY_MS = 86_400_000;

export class Vault {
  constructor(
    private readonly pool: Pool,
    private readonly dataKeys: Pick<DataKeys, 'active' | 'byKeyId'>,
    private readonly clock: () => Date = () => new Date(),
  ) {}

  /** Stores a new credential, or a new current version of an existing one (check-and-set with expectedVersion). */
  store(caller: Caller, input: StoreInput): Promise<StoredVersion> {
    return this.audited(caller, 'vault.store', { name: input.name }, async (tx, note) => {
      const plaintext = input.kind === 'totp_seed' ? toOtpauthUri(normalizeTotp(input.totp!, input.name)) : input.value!;
      const existing = await this.lockOrCreate(tx, caller.identityId, input);
      note.credentialId = existing.id;
      let version = 1;
      if (!existing.created) {
        if (input.expectedVersion !== undefined && input.expectedVersion !== existing.currentVersion) {
          throw new VersionConflictError(
            `credential '${input.name}' is at version ${existing.currentVersion}, not ${input.expectedVersion}`,
            existing.currentVersion,
          );
        }
        if (existing.kind !== input.kind) {
          throw new UnprocessableError(`credential '${input.name}' is a ${existing.kind}; its kind cannot change to ${input.kind}`);
        }
        const max = await tx.query('SELECT max(version) AS v FROM secret_versions WHERE credential_id = $1', [existing.id]);
        version = Number(max.rows[0].v) + 1;
        await tx.query(
          `UPDATE credentials
              SET previous_version = current_version, current_version = $2,
                  metadata = coalesce($3, metadata), owners = coalesce($4, owners),
                  rotation = CASE WHEN $5::boolean THEN $6::jsonb ELSE rotation END,
                  expires_at = CASE WHEN $7::boolean THEN $8::timestamptz ELSE expires_at END,
                  updated_at = $9
            WHERE id = $1`,
          [
            existing.id,
            version,
            input.metadata ?? null,
            input.owners ?? null,
            input.rotation !== undefined,
            input.rotation ? JSON.stringify(input.rotation) : null,
            input.expiresAt !== undefined,
            input.expiresAt ?? null,
            this.clock(),
          ],
        );
      }
      const createdAt = await this.insertVersion(tx, caller.identityId, existing.id, version, plaintext);
      note.detail.version = version;
      return { id: existing.id, name: input.name, version, createdAt: createdAt.toISOString() };
    });
  }

  /** Reads a version's value (the current one unless `version` is given). */
  get(caller: Caller, ref: CredentialRef, version?: number): Promise<SecretRead> {
    return this.audited(caller, 'vault.get', refDetail(ref, version), async (tx, note) => {
      const row = await this.readVersion(tx, caller.identityId, ref, version, note);
      return {
        id: row.id,
        name: row.name,
        kind: row.kind,
        version: row.version,
        label: row.label,
        value: row.value,
        createdAt: row.createdAt.toISOString(),
        ageDays: this.ageDays(row.createdAt),
      };
    });
  }

  /** The TOTP code of a totp_seed credential at the vault's clock. */
  totp(caller: Caller, ref: CredentialRef): Promise<TotpCode> {
    return this.audited(caller, 'vault.totp', refDetail(ref), async (tx, note) => {
      const row = await this.readVersion(tx, caller.identityId, ref, undefined, note);
      if (row.kind !== 'totp_seed') {
        throw new UnprocessableError(`credential '${row.name}' is a ${row.kind}, not a totp_seed`);
      }
      return totpCode(parseStoredTotp(row.value), this.clock().getTime());
    });
  }

  /** Metadata only, never a value. */
  async list(identityId: string, filter: ListFilter): Promise<CredentialMeta[]> {
    const now = this.clock();
    const { rows } = await this.pool.query(
      `SELECT c.*, v.created_at AS version_created_at, ${NEXT_ROTATION} AS next_rotation_at
         FROM credentials c
         JOIN secret_versions v ON v.credential_id = c.id AND v.version = c.current_version
        WHERE c.identity_id = $1
          AND ($2::text IS NULL OR c.kind = $2)
          AND ($3::int IS NULL OR v.created_at < $6::timestamptz - make_interval(days => $3::int))
          AND ($4::int IS NULL OR ${NEXT_ROTATION} <= $6::timestamptz + make_interval(days => $4::int))
          AND ($5::text IS NULL OR c.name > $5)
        ORDER BY c.name
        LIMIT $7`,
      [identityId, filter.kind ?? null, filter.olderThanDays ?? null, filter.dueWithinDays ?? null, filter.after ?? null, now, filter.limit],
    );
    return rows.map((r) => this.toMeta(r));
  }

  async describe(identityId: string, credentialId: string): Promise<CredentialMeta> {
    const { rows } = await this.pool.query(
      `SELECT c.*, v.created_at AS version_created_at, ${NEXT_ROTATION} AS next_rotation_at
         FROM credentials c
         JOIN secret_versions v ON v.credential_id = c.id AND v.version = c.current_version
        WHERE c.identity_id = $1 AND c.id = $2`,
      [identityId, credentialId],
    );
    if (!rows[0]) throw new NotFoundError(`no credential with id ${credentialId}`);
    return this.toMeta(rows[0]);
  }

  /** Resolves names or ids to credential ids in the caller's scope; names any that do not exist. */
  async resolve(identityId: string, refs: string[]): Promise<{ found: Map<string, string>; missing: string[] }> {
    const { rows } = await this.pool.query(
      `SELECT id, name FROM credentials WHERE identity_id = $1 AND (name = ANY($2::text[]) OR id::text = ANY($2::text[]))`,
      [identityId, refs],
    );
    const found = new Map<string, string>();
    for (const ref of refs) {
      const row = rows.find((r) => r.name === ref || r.id === ref);
      if (row) found.set(ref, row.id);
    }
    return { found, missing: refs.filter((r) => !found.has(r)) };
  }

  /**
   * Rotation step 1: stores `makeValue()` as the pending version. Idempotent under `rotationKey`:
   * a retried step returns the version it already made. A pending version left by an earlier,
   * abandoned rotation is discarded rather than blocking this one.
   */
  stagePending(caller: Caller, credentialId: string, rotationKey: string, makeValue: (kind: Kind) => Promise<string>) {
    return this.audited(caller, 'rotation.create_pending', { rotationKey }, async (tx, note) => {
      note.credentialId = credentialId;
      const cred = await this.lockById(tx, caller.identityId, credentialId);
      const done = await tx.query('SELECT version FROM secret_versions WHERE credential_id = $1 AND rotation_key = $2', [
        credentialId,
        rotationKey,
      ]);
      if (done.rows[0]) {
        note.detail.version = done.rows[0].version;
        note.detail.replayed = true;
        return { version: Number(done.rows[0].version), basedOn: cred.current_version as number };
      }
      const max = await tx.query('SELECT max(version) AS v FROM secret_versions WHERE credential_id = $1', [credentialId]);
      const version = Number(max.rows[0].v) + 1;
      const value = await makeValue(cred.kind);
      await this.insertVersion(tx, caller.identityId, credentialId, version, value, { rotationKey, basedOn: cred.current_version });
      await tx.query(`UPDATE credentials SET pending_version = $2, status = 'rotating', updated_at = $3 WHERE id = $1`, [
        credentialId,
        version,
        this.clock(),
      ]);
      note.detail.version = version;
      if (cred.pending_version) note.detail.discardedPending = cred.pending_version;
      return { version, basedOn: cred.current_version as number };
    });
  }

  /** Rotation step: pending → current, current → previous. Idempotent; refuses if a newer value was stored meanwhile. */
  promote(caller: Caller, credentialId: string, version: number) {
    return this.audited(caller, 'rotation.promote', { version }, async (tx, note) => {
      note.credentialId = credentialId;
      const cred = await this.lockById(tx, caller.identityId, credentialId);
      if (cred.current_version === version) {
        note.detail.replayed = true;
        return { current: version, previous: cred.previous_version as number | null };
      }
      if (cred.pending_version !== version) {
        throw new UnprocessableError(`version ${version} of credential ${credentialId} is not pending`);
      }
      const based = await tx.query('SELECT based_on FROM secret_versions WHERE credential_id = $1 AND version = $2', [credentialId, version]);
      if (based.rows[0]?.based_on !== cred.current_version) {
        throw new VersionConflictError(
          `credential ${credentialId} moved to version ${cred.current_version} while version ${version} was pending`,
          cred.current_version,
        );
      }
      await tx.query(
        `UPDATE credentials SET previous_version = current_version, current_version = $2, pending_version = NULL,
                status = 'active', updated_at = $3 WHERE id = $1`,
        [credentialId, version, this.clock()],
      );
      return { current: version, previous: cred.current_version as number };
    });
  }

  /** Compensation: drops the pending label (the version row stays for the audit trail) and marks the failure. */
  discardPending(caller: Caller, credentialId: string, version: number | null, status: 'active' | 'rotation_failed') {
    return this.audited(caller, 'rotation.discard_pending', { version }, async (tx, note) => {
      note.credentialId = credentialId;
      await this.lockById(tx, caller.identityId, credentialId);
      await tx.query(
        `UPDATE credentials SET pending_version = CASE WHEN pending_version = $2 THEN NULL ELSE pending_version END,
                status = $3, updated_at = $4 WHERE id = $1`,
        [credentialId, version, status, this.clock()],
      );
    });
  }

  /** Every value the identity stores, in any version: for refusing mail that would carry one. Not a disclosure, so not audited. */
  async storedValues(identityId: string): Promise<{ name: string; value: string }[]> {
    const { rows } = await this.pool.query(
      `SELECT c.id, c.name, v.version, v.data_key_id, v.sealed
         FROM credentials c JOIN secret_versions v ON v.credential_id = c.id
        WHERE c.identity_id = $1`,
      [identityId],
    );
    const out: { name: string; value: string }[] = [];
    for (const r of rows) {
      const key = await this.dataKeys.byKeyId(this.pool, identityId, r.data_key_id);
      const aad = versionAad(identityId, r.id, r.version);
      out.push({ name: r.name, value: open(key.key, r.sealed, aad, `version ${r.version} of '${r.name}'`).toString('utf8') });
    }
    return out;
  }

  ageDays(createdAt: Date): number {
    return Math.max(0, Math.floor((this.clock().getTime() - createdAt.getTime()) / DAY_MS));
  }

  private async audited<T>(
    caller: Caller,
    action: string,
    detail: Record<string, unknown>,
    fn: (tx: Db, note: AuditNote) => Promise<T>,
  ): Promise<T> {
    const note: AuditNote = { credentialId: null, detail: { ...detail } };
    try {
      return await withTransaction(this.pool, async (tx) => {
        const result = await fn(tx, note);
        await appendAudit(tx, { ...this.auditBase(caller, action, note), outcome: 'ok' });
        return result;
      });
    } catch (err) {
      await appendAudit(this.pool, {
        ...this.auditBase(caller, action, note),
        outcome: outcomeOf(err),
        detail: { ...note.detail, ...errorDetail(err) },
      });
      throw markAudited(err);
    }
  }

  private auditBase(caller: Caller, action: string, note: AuditNote) {
    return {
      identityId: caller.identityId,
      actor: caller.actor,
      action,
      credentialId: note.credentialId,
      requestId: caller.requestId,
      detail: note.detail,
    };
  }

  private async lockOrCreate(
    tx: Db,
    identityId: string,
    input: StoreInput,
  ): Promise<{ id: string; created: boolean; currentVersion: number; kind: Kind }> {
    for (let attempt = 0; attempt < 2; attempt++) {
      const found = await tx.query('SELECT id, kind, current_version FROM credentials WHERE identity_id = $1 AND name = $2 FOR NO KEY UPDATE', [
        identityId,
        input.name,
      ]);
      if (found.rows[0]) return { id: found.rows[0].id, created: false, currentVersion: found.rows[0].current_version, kind: found.rows[0].kind };
      if (input.expectedVersion !== undefined && input.expectedVersion !== 0) {
        throw new VersionConflictError(`credential '${input.name}' does not exist yet; expectedVersion must be 0 or absent`, null);
      }
      const id = randomUUID();
      const now = this.clock();
      // A concurrent first store of the same name wins the unique index; then we lock its row instead.
      const inserted = await tx.query(
        `INSERT INTO credentials (id, identity_id, name, kind, metadata, owners, rotation, expires_at, current_version, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 1, $9, $9)
         ON CONFLICT (identity_id, name) DO NOTHING RETURNING id`,
        [id, identityId, input.name, input.kind, input.metadata ?? {}, input.owners ?? [], input.rotation ? JSON.stringify(input.rotation) : null, input.expiresAt ?? null, now],
      );
      if (inserted.rows[0]) return { id, created: true, currentVersion: 1, kind: input.kind };
    }
    throw new Error(`could not create or lock credential '${input.name}'`);
  }

  private async lockById(tx: Db, identityId: string, credentialId: string) {
    const { rows } = await tx.query('SELECT * FROM credentials WHERE id = $1 AND identity_id = $2 FOR NO KEY UPDATE', [credentialId, identityId]);
    if (!rows[0]) throw new NotFoundError(`no credential with id ${credentialId}`);
    return rows[0];
  }

  private async insertVersion(
    tx: Db,
    identityId: string,
    credentialId: string,
    version: number,
    value: string,
    rotation?: { rotationKey: string; basedOn: number },
  ): Promise<Date> {
    const key = await this.dataKeys.active(tx, identityId);
    const plaintext = Buffer.from(value, 'utf8');
    const sealed = seal(key.key, plaintext, versionAad(identityId, credentialId, version));
    plaintext.fill(0);
    const createdAt = this.clock();
    await tx.query(
      `INSERT INTO secret_versions (credential_id, version, data_key_id, sealed, rotation_key, based_on, created_at)
       VALUES ($1, $2, $3, $4, $5, $6, $7)`,
      [credentialId, version, key.id, sealed, rotation?.rotationKey ?? null, rotation?.basedOn ?? null, createdAt],
    );
    return createdAt;
  }

  private async readVersion(tx: Db, identityId: string, ref: CredentialRef, version: number | undefined, note: AuditNote) {
    const byId = 'id' in ref;
    const { rows } = await tx.query(
      `SELECT c.id, c.name, c.kind, c.current_version, c.previous_version, c.pending_version,
              v.version, v.data_key_id, v.sealed, v.created_at
         FROM credentials c
         JOIN secret_versions v ON v.credential_id = c.id AND v.version = coalesce($3::int, c.current_version)
        WHERE c.identity_id = $1 AND ${byId ? 'c.id = $2::uuid' : 'c.name = $2'}`,
      [identityId, byId ? ref.id : ref.name, version ?? null],
    );
    const row = rows[0];
    if (!row) {
      const what = byId ? `id ${ref.id}` : `name '${ref.name}'`;
      throw new NotFoundError(version ? `no version ${version} of a credential with ${what}` : `no credential with ${what}`);
    }
    note.credentialId = row.id;
    note.detail.version = row.version;
    await tx.query('UPDATE credentials SET last_accessed_at = $2 WHERE id = $1', [row.id, this.clock()]);
    const key = await this.dataKeys.byKeyId(tx, identityId, row.data_key_id);
    const value = open(key.key, row.sealed, versionAad(identityId, row.id, row.version), `version ${row.version} of '${row.name}'`).toString('utf8');
    const label: VersionLabel =
      row.version === row.current_version ? 'current' : row.version === row.previous_version ? 'previous' : row.version === row.pending_version ? 'pending' : null;
    return { id: row.id as string, name: row.name as string, kind: row.kind as Kind, version: row.version as number, label, value, createdAt: row.created_at as Date };
  }

  private toMeta(r: Record<string, any>): CredentialMeta {
    return {
      id: r.id,
      name: r.name,
      kind: r.kind,
      version: r.current_version,
      previousVersion: r.previous_version,
      pendingVersion: r.pending_version,
      ageDays: this.ageDays(r.version_created_at),
      createdAt: r.created_at.toISOString(),
      versionCreatedAt: r.version_created_at.toISOString(),
      metadata: r.metadata,
      owners: r.owners,
      policy: r.rotation,
      nextRotationAt: r.next_rotation_at ? r.next_rotation_at.toISOString() : null,
      expiresAt: r.expires_at ? r.expires_at.toISOString() : null,
      lastAccessedAt: r.last_accessed_at ? r.last_accessed_at.toISOString() : null,
      status: r.status,
    };
  }
}

const NEXT_ROTATION = `CASE WHEN c.rotation IS NULL THEN NULL
  ELSE v.created_at + make_interval(days => (c.rotation->>'periodDays')::int) END`;

function refDetail(ref: CredentialRef, version?: number): Record<string, unknown> {
  return { ...('name' in ref ? { name: ref.name } : { ref: ref.id }), ...(version ? { requestedVersion: version } : {}) };
}
