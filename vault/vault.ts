import { randomUUID } from 'node:crypto';
import type { Db, Pool } from '../db/pool';
import { ConflictError, NotFoundError, refWithheld, storedValueGiven, UnprocessableError } from '../core/errors';
import { audited, type AuditNote } from './audited';
import { lastReadSql } from './audit';
import { INT4_MAX, ReadBatcher, storable } from './read-batch';
import { secretName, StoreBatcher, storeRefusal, UNCONFIRMED_STORE } from './store-batch';
import type { ReadThread } from './read-thread';
import type { SecretStore } from './secret-store';
import { parseStoredTotp, storedTotpUri, totpCode, type TotpCode } from './totp';
import { aKind, TOTP_SEED_NOT_ROTATED, type Caller, type CredentialMeta, type CredentialPolicy, type CredentialRef, type Kind, type SecretRead, type StoredVersion, type StoreInput } from './types';
import { idOf, UUID } from '../core/ids';
import { storedRefs, withhold, withholdStored } from './withheld';

export * from './types';

/**
 * The vault's primitives: store, get, totp, and the credential's life around them (policy,
 * soft delete, restore, destroy). Every call runs in one transaction with its audit row; concurrent
 * reads share one (see read-batch.ts), each still with its own row.
 * Reads are scoped to the caller's own credentials, plus (by id) those granted to it.
 */

export interface ListFilter {
  kind?: Kind;
  olderThanDays?: number;
  dueWithinDays?: number;
  after?: string;
  limit: number;
  includeDeleted?: boolean;
}

const DAY_MS = 86_400_000;
type VersionPage = { id: string; name: string; owner_id: string; version: number; data_key_id: string; sealed: Buffer };
/** Versions storedValues decrypts at a time. */
const STORED_VALUES_PAGE = 1_000;

/** Policy columns a store or an update may set; absent fields keep their value. */
const POLICY_COLUMNS: [keyof CredentialPolicy, string, (v: any) => unknown][] = [
  ['metadata', 'metadata', (v) => v],
  ['owners', 'owners', (v) => v],
  ['service', 'service', (v) => v],
  ['tags', 'tags', (v) => v],
  ['rotation', 'rotation', (v) => (v ? JSON.stringify(v) : null)],
  ['dependents', 'dependents', (v) => JSON.stringify(v)],
  ['notify', 'notify', (v) => v],
  ['expiresAt', 'expires_at', (v) => v],
];

export class Vault {
  private readonly reads: ReadBatcher;
  private readonly writes: StoreBatcher;

  constructor(
    private readonly pool: Pool,
    private readonly secrets: SecretStore,
    private readonly clock: () => Date = () => new Date(),
    /** Where get, getMasked, totp and store run when not here: the API's vault thread (see read-thread.ts), with the wall clock. */
    private readonly thread?: ReadThread,
  ) {
    this.reads = new ReadBatcher(pool, secrets);
    this.writes = new StoreBatcher(pool, secrets, clock, (caller, input) => this.storeAlone(caller, input));
  }

  /** How many read batches ran and how many calls they carried (see read-batch.ts). */
  readBatchStats(): { batches: number; calls: number } {
    return this.thread ? this.thread.stats() : { ...this.reads.stats };
  }

  /**
   * Stores a new credential, or a new current version of an existing one (check-and-set with
   * expectedVersion). Concurrent stores commit together (see store-batch.ts); one that also sets
   * policy, or whose input the database could not take, stores alone.
   */
  store(caller: Caller, input: StoreInput): Promise<StoredVersion> {
    if (this.thread) return this.thread.store(caller, input);
    if (POLICY_COLUMNS.some(([field]) => input[field] !== undefined) || !batchable(caller, input)) return this.storeAlone(caller, input);
    let plaintext: string;
    try {
      plaintext = plaintextOf(input);
    } catch {
      return this.storeAlone(caller, input); // refused there, with its audit row
    }
    return this.writes.store(caller, input, plaintext);
  }

  /** One store in a transaction of its own: policy columns, and every call of a batch that rolled back. */
  private storeAlone(caller: Caller, input: StoreInput): Promise<StoredVersion> {
    return audited(this.pool, caller, 'vault.store', { name: input.name }, async (tx, note) => {
      // The name is checked first (lockOrCreate: a new name that is a value the caller can read is
      // withheld from this row), then the value: a TOTP seed refused before the check wrote such a
      // name into the audit row as given.
      const existing = await this.lockOrCreate(tx, caller.identityId, input, note);
      const plaintext = plaintextOf(input);
      note.credentialId = existing.id;
      let version = 1;
      if (!existing.created) {
        const refusal = storeRefusal(input, existing);
        if (refusal) throw refusal;
        const next = await tx.query({
          name: 'credential-next-version',
          text: `UPDATE credentials SET previous_version = current_version, updated_at = $2,
                   current_version = (SELECT coalesce(max(version), 0) + 1 FROM secret_versions WHERE credential_id = $1)
                  WHERE id = $1 RETURNING current_version`,
          values: [existing.id, this.clock()],
        });
        version = next.rows[0].current_version;
        await this.setPolicy(tx, existing.id, input);
      }
      const createdAt = await this.secrets.insert(tx, caller.identityId, existing.id, version, plaintext, { providerRef: input.externalId });
      note.detail.version = version;
      return { id: existing.id, name: input.name, version, createdAt: createdAt.toISOString() };
    }, UNCONFIRMED_STORE, ['name']);
  }

  /** How many store batches ran, how many calls they carried, and how many rolled back to store alone. */
  storeBatchStats(): { batches: number; calls: number; fallbacks: number } {
    return this.thread ? this.thread.storeStats() : { ...this.writes.stats };
  }

  /** Reads a version's value (the current one unless `version` is given). `auditDetail` is added to the audit row (never a value). */
  get(caller: Caller, ref: CredentialRef, version?: number, auditDetail: Record<string, unknown> = {}): Promise<SecretRead> {
    if (this.thread) return this.thread.call('get', caller, ref, version, auditDetail);
    return this.reads.read({
      caller,
      action: 'vault.get',
      ref,
      version,
      detail: { ...refDetail(ref, version), ...auditDetail },
      open: true,
      finish: ({ ownerId: _owner, ...row }) => this.dated(row),
    });
  }

  /**
   * A masked read (MCP's default): what `get` returns except the value, with the same scoping and
   * an audit row of the same action marked `masked`. The value is never decrypted.
   */
  getMasked(caller: Caller, ref: CredentialRef, version?: number): Promise<Omit<SecretRead, 'value'>> {
    if (this.thread) return this.thread.call('masked', caller, ref, version);
    return this.reads.read({
      caller,
      action: 'vault.get',
      ref,
      version,
      detail: { ...refDetail(ref, version), masked: true },
      open: false,
      finish: ({ ownerId: _owner, value: _none, ...row }) => this.dated(row),
    });
  }

  /** The TOTP code of a totp_seed credential at the vault's clock. */
  totp(caller: Caller, ref: CredentialRef): Promise<TotpCode> {
    if (this.thread) return this.thread.call('totp', caller, ref);
    return this.reads.read({
      caller,
      action: 'vault.totp',
      ref,
      detail: refDetail(ref),
      open: true,
      finish: (row) => {
        if (row.kind !== 'totp_seed') throw new UnprocessableError(`credential '${row.name}' is ${aKind(row.kind)}, not a totp_seed`);
        return totpCode(parseStoredTotp(row.value), this.clock().getTime());
      },
    });
  }

  /** Changes a credential's policy (owners, rotation, dependents …) without touching its value. Never rotates. */
  update(caller: Caller, ref: CredentialRef, policy: CredentialPolicy): Promise<CredentialMeta> {
    return audited(this.pool, caller, 'credential.update', { ...refDetail(ref), fields: Object.keys(policy) }, async (tx, note) => {
      const id = await this.lockOwn(tx, caller.identityId, ref, note);
      if (policy.rotation) {
        const { rows } = await tx.query<{ kind: string }>('SELECT kind FROM credentials WHERE id = $1', [id]);
        if (rows[0]!.kind === 'totp_seed') throw new UnprocessableError(TOTP_SEED_NOT_ROTATED);
      }
      await this.setPolicy(tx, id, policy);
      await tx.query('UPDATE credentials SET updated_at = $2 WHERE id = $1', [id, this.clock()]);
      return this.describeIn(tx, caller.identityId, id);
    }, undefined, Object.keys(refDetail(ref)));
  }

  /** Soft delete: hidden from every read and rotation, restorable until destroyed; its grants are revoked. */
  remove(caller: Caller, ref: CredentialRef): Promise<{ id: string; deletedAt: string }> {
    return audited(this.pool, caller, 'credential.delete', refDetail(ref), async (tx, note) => {
      const id = await this.lockOwn(tx, caller.identityId, ref, note);
      const now = this.clock();
      await tx.query('UPDATE credentials SET deleted_at = $2, updated_at = $2 WHERE id = $1', [id, now]);
      // Its grants end with it, as with a destroy: hidden from the grant lists while it is deleted,
      // they would otherwise give the grantees their access back, unseen, when it is restored.
      const revoked = await revokeGrants(tx, id, now);
      if (revoked) note.detail.grantsRevoked = revoked;
      return { id, deletedAt: now.toISOString() };
    }, undefined, Object.keys(refDetail(ref)));
  }

  restore(caller: Caller, ref: CredentialRef): Promise<CredentialMeta> {
    return audited(this.pool, caller, 'credential.restore', refDetail(ref), async (tx, note) => {
      const id = await this.lockOwn(tx, caller.identityId, ref, note, { deleted: true });
      await tx.query('UPDATE credentials SET deleted_at = NULL, updated_at = $2 WHERE id = $1', [id, this.clock()]);
      return this.describeIn(tx, caller.identityId, id);
    }, undefined, Object.keys(refDetail(ref)));
  }

  /**
   * Destroys every version's ciphertext (the credential row stays as a tombstone for the audit
   * trail, and its name is free again). Irreversible. Works on live and soft-deleted credentials.
   */
  destroy(
    caller: Caller,
    ref: CredentialRef,
    opts: {
      deletedBefore?: Date;
      /** Throws to refuse the destroy of the credential found (its rotation is running, say): rolled back and audited as refused. */
      check?: (credentialId: string) => Promise<void>;
    } = {},
  ): Promise<{ id: string; destroyedVersions: number }> {
    return audited(this.pool, caller, 'credential.destroy', refDetail(ref), async (tx, note) => {
      // `deletedBefore` (retention): checked under the row lock, so one restored meanwhile is not destroyed.
      const which = opts.deletedBefore ? { deletedBefore: opts.deletedBefore } : { deleted: 'any' as const };
      // The check (a call to Temporal) is made before the row is locked: a slow answer must not hold
      // up every change of the credential, nor a rotation's steps, behind the lock.
      // Then locked by the id it checked: a name freed and taken again meanwhile is not the one checked.
      const checked = opts.check ? await this.lockOwn(tx, caller.identityId, ref, note, { ...which, lock: false }) : undefined;
      if (checked) await opts.check!(checked);
      const id = await this.lockOwn(tx, caller.identityId, checked ? { id: checked } : ref, note, which);
      // A rotation that began after the check may have asked its provider for a new value already:
      // destroyed now, the value it makes could be neither staged nor undone (an orphaned key at the
      // provider, no notice). Its create reads the current value first, under a share lock on the
      // credential row, so a read that came before this lock has committed its audit row by now, and
      // one that comes after waits for this destroy and then finds nothing to read.
      if (checked) {
        const begun = await tx.query(
          `SELECT 1 FROM audit_log WHERE credential_id = $1 AND action = 'rotation.read' AND outcome = 'ok' AND detail->>'purpose' = 'provider.create' AND at >= now() LIMIT 1`,
          [id],
        );
        if (begun.rowCount) {
          throw new ConflictError(
            `a rotation of the credential began while the destroy was being checked (workflow rotate:${id}): nothing was destroyed. Let it end (or cancel it), then destroy again`,
          );
        }
      }
      const { rowCount } = await tx.query('DELETE FROM secret_versions WHERE credential_id = $1', [id]);
      const now = this.clock();
      await tx.query(
        `UPDATE credentials SET destroyed_at = $2, deleted_at = coalesce(deleted_at, $2), updated_at = $2,
                next_rotation_at = NULL, pending_version = NULL WHERE id = $1`,
        [id, now],
      );
      await revokeGrants(tx, id, now);
      note.detail.destroyedVersions = rowCount;
      return { id, destroyedVersions: rowCount ?? 0 };
    }, undefined, Object.keys(refDetail(ref)));
  }

  /** Metadata only, never a value. */
  async list(identityId: string, filter: ListFilter): Promise<CredentialMeta[]> {
    const now = this.clock();
    const { rows } = await this.pool.query(
      `${SELECT_META}
        WHERE c.identity_id = $1 AND c.destroyed_at IS NULL AND ($8::boolean OR c.deleted_at IS NULL)
          AND ($2::text IS NULL OR c.kind = $2)
          AND ($3::int IS NULL OR v.created_at < $6::timestamptz - make_interval(days => $3::int))
          AND ($4::int IS NULL OR c.next_rotation_at <= $6::timestamptz + make_interval(days => $4::int))
          AND ($5::text IS NULL OR c.name > $5)
        ORDER BY c.name
        LIMIT $7`,
      [identityId, filter.kind ?? null, filter.olderThanDays ?? null, filter.dueWithinDays ?? null, filter.after ?? null, now, filter.limit, filter.includeDeleted ?? false],
    );
    return rows.map((r) => this.toMeta(r));
  }

  /** One credential's metadata, own credentials only; deleted ones too (the rotation needs them to compensate). */
  async describe(identityId: string, credentialId: string): Promise<CredentialMeta> {
    return this.describeIn(this.pool, identityId, credentialId);
  }

  /** Resolves names or ids to live credential ids in the caller's scope; names any that do not exist. */
  async resolve(identityId: string, refs: string[]): Promise<{ found: Map<string, string>; missing: string[] }> {
    const { rows } = await this.pool.query(
      `SELECT id, name FROM credentials
        WHERE identity_id = $1 AND deleted_at IS NULL AND (name = ANY($2::text[]) OR id = ANY($3::uuid[]))`,
      [identityId, refs, refs.flatMap((ref) => idOf(ref) ?? [])],
    );
    const found = new Map<string, string>();
    for (const ref of refs) {
      const id = idOf(ref);
      const row = rows.find((r) => r.name === ref || r.id === id);
      if (row) found.set(ref, row.id);
    }
    return { found, missing: refs.filter((r) => !found.has(r)) };
  }

  /**
   * Which of the references a caller gave are values it can read (vault/withheld.ts): for a refusal
   * that would name the ones it did not find.
   */
  storedRefs(identityId: string, given: string[]): Promise<Set<string>> {
    return storedRefs(this.pool, this.secrets, identityId, given);
  }

  /**
   * The credential a name or id refers to in the caller's scope for reading its audit trail, which
   * outlives it: deleted and destroyed ones count too. A name names the live credential if there is
   * one, else the one most recently deleted under it.
   */
  async resolveForAudit(identityId: string | null, ref: string): Promise<string | undefined> {
    const { rows } = await this.pool.query(
      `SELECT id, identity_id, coalesce(id = $3::uuid, false) AS by_id, deleted_at IS NULL AS live FROM credentials
        WHERE ($1::uuid IS NULL OR identity_id = $1) AND (name = $2 OR id = $3::uuid)
        ORDER BY by_id DESC, deleted_at IS NULL DESC, deleted_at DESC`,
      [identityId, ref, idOf(ref) ?? null],
    );
    // Without an identity (the admin), a name several identities use names none of them: the live
    // credentials of that name if there is one, else those deleted or destroyed under it (before, a
    // destroyed one, whose name is free again, made the live one of another identity's a 422).
    if (identityId === null && !rows[0]?.by_id) {
      const live = rows.filter((r) => r.live);
      const named = live.length > 0 ? live : rows;
      if (new Set(named.map((r) => r.identity_id)).size > 1) {
        throw new UnprocessableError(`'${ref}' names credentials of several identities; give the credential's id`);
      }
      return named[0]?.id;
    }
    return rows[0]?.id;
  }

  /**
   * Every value the identity stores, in any version (or only those of `credentialIds`): for refusing
   * mail that would carry one. Not a disclosure, so not audited. Decrypts each version, a page at a
   * time: the time grows with what it covers, the memory does not (an identity with 70,000 versions
   * once took a worker past 400 MB when all were held at once).
   */
  storedValues(identityId: string, credentialIds?: string[], pageSize = STORED_VALUES_PAGE): AsyncGenerator<{ name: string; value: string }[]> {
    return this.valuePages(
      `SELECT c.id, c.name, c.identity_id AS owner_id, v.version, v.data_key_id, v.sealed
         FROM credentials c JOIN secret_versions v ON v.credential_id = c.id
        WHERE c.identity_id = $1 AND ($2::uuid[] IS NULL OR c.id = ANY($2::uuid[]))`,
      [identityId, credentialIds ?? null],
      pageSize,
    );
  }

  /**
   * Every value the identity may read or once could: its own (storedValues) and those of the
   * credentials other identities have granted it, in any version stored before its last grant ended
   * (every version while one is active), whether the grant is still active or was revoked since
   * (directly, or by the credential's deletion). What mail.send must refuse: a
   * grantee that read a granted value could otherwise mail it on, and a revoked grant does not make
   * it forget the value, which may still work at its provider. Each version once, however many
   * grants led to it. Not audited either.
   */
  async *readableValues(identityId: string, pageSize = STORED_VALUES_PAGE): AsyncGenerator<{ name: string; value: string }[]> {
    yield* this.storedValues(identityId, undefined, pageSize);
    yield* this.valuePages(
      // The grantee's credentials first (grants_grantee_all), each once with the end of its last
      // grant (none while one is active): a page is then read from those credentials' versions, not
      // found by walking every version in the vault. A version stored after the last grant ended was
      // never the grantee's to read, and is left out: a refusal would tell it a guess was right.
      `WITH granted AS MATERIALIZED (
         SELECT credential_id, max(coalesce(revoked_at, 'infinity'::timestamptz)) AS until FROM grants WHERE grantee_id = $1 GROUP BY credential_id)
       SELECT c.id, c.name, c.identity_id AS owner_id, v.version, v.data_key_id, v.sealed
         FROM granted g JOIN credentials c ON c.id = g.credential_id JOIN secret_versions v ON v.credential_id = c.id
        WHERE c.identity_id <> $1 AND v.created_at <= g.until`,
      [identityId],
      pageSize,
    );
  }

  /** Pages of the versions `from` selects (its WHERE takes `params`; the page's keyset follows), each opened with its owner's key. */
  private async *valuePages(from: string, params: unknown[], pageSize: number): AsyncGenerator<{ name: string; value: string }[]> {
    const [id, version, limit] = [params.length + 1, params.length + 2, params.length + 3];
    let after: { id: string; version: number } | null = null;
    for (;;) {
      const { rows } = await this.pool.query<VersionPage>(
        `${from}
            AND ($${id}::uuid IS NULL OR (v.credential_id, v.version) > ($${id}::uuid, $${version}::int))
          ORDER BY v.credential_id, v.version
          LIMIT $${limit}`,
        [...params, after?.id ?? null, after?.version ?? 0, pageSize],
      );
      const page: { name: string; value: string }[] = [];
      for (const r of rows) page.push({ name: r.name, value: await this.secrets.open(this.pool, r.owner_id, r.id, r.name, r) });
      if (page.length > 0) yield page;
      if (rows.length < pageSize) return;
      const last: VersionPage = rows[rows.length - 1]!;
      after = { id: last.id, version: last.version };
    }
  }

  /** A read's row as the API answers it: its time in ISO form, and its age in days. */
  private dated<R extends { createdAt: Date }>(row: R): Omit<R, 'createdAt'> & { createdAt: string; ageDays: number } {
    return { ...row, createdAt: row.createdAt.toISOString(), ageDays: this.ageDays(row.createdAt) };
  }

  ageDays(createdAt: Date): number {
    return Math.max(0, Math.floor((this.clock().getTime() - createdAt.getTime()) / DAY_MS));
  }

  private async describeIn(db: Db, identityId: string, credentialId: string): Promise<CredentialMeta> {
    const { rows } = await db.query(`${SELECT_META} WHERE c.identity_id = $1 AND c.id = $2 AND c.destroyed_at IS NULL`, [identityId, credentialId]);
    if (!rows[0]) throw new NotFoundError(`no credential with id ${credentialId}`);
    return this.toMeta(rows[0]);
  }

  private async setPolicy(tx: Db, id: string, policy: CredentialPolicy): Promise<void> {
    const set = POLICY_COLUMNS.filter(([field]) => policy[field] !== undefined);
    if (set.length === 0) return;
    await tx.query(
      `UPDATE credentials SET ${set.map(([, column], i) => `${column} = $${i + 2}`).join(', ')} WHERE id = $1`,
      [id, ...set.map(([field, , encode]) => encode(policy[field]))],
    );
  }

  private async lockOrCreate(
    tx: Db,
    identityId: string,
    input: StoreInput,
    note: AuditNote,
  ): Promise<{ id: string; created: boolean; deleted: boolean; currentVersion: number; kind: Kind }> {
    let checked = false;
    for (let attempt = 0; attempt < 2; attempt++) {
      const found = await tx.query({
        name: 'credential-lock-by-name',
        text: `SELECT id, kind, current_version, deleted_at FROM credentials
                WHERE identity_id = $1 AND name = $2 AND destroyed_at IS NULL FOR NO KEY UPDATE`,
        values: [identityId, input.name],
      });
      const row = found.rows[0];
      if (row) {
        note.unchecked.clear(); // the name of one of the caller's credentials
        return { id: row.id, created: false, deleted: row.deleted_at !== null, currentVersion: row.current_version, kind: row.kind };
      }
      if (!checked) {
        checked = true;
        const secret = secretName(input, (await storedRefs(tx, this.secrets, identityId, [input.name])).has(input.name));
        if (secret) {
          withhold(note.detail, 'name');
          throw secret;
        }
        note.unchecked.clear(); // checked: not a value the caller can read
      }
      const refusal = storeRefusal(input, null);
      if (refusal) throw refusal;
      const id = randomUUID();
      const now = this.clock();
      // A concurrent first store of the same name wins the unique index; then we lock its row instead.
      const inserted = await tx.query(
        `INSERT INTO credentials (id, identity_id, name, kind, current_version, created_at, updated_at)
         VALUES ($1, $2, $3, $4, 1, $5, $5)
         ON CONFLICT (identity_id, name) WHERE destroyed_at IS NULL DO NOTHING RETURNING id`,
        [id, identityId, input.name, input.kind, now],
      );
      if (inserted.rows[0]) {
        await this.setPolicy(tx, id, input);
        return { id, created: true, deleted: false, currentVersion: 1, kind: input.kind };
      }
    }
    throw new Error(`could not create or lock credential '${input.name}'`);
  }

  /** Locks one of the caller's own credentials (grants never allow changes). */
  private async lockOwn(
    tx: Db,
    identityId: string,
    ref: CredentialRef,
    note: AuditNote,
    /** `lock: false`: found, not locked (a check made before the lock is taken). */
    opts: { deleted?: boolean | 'any'; deletedBefore?: Date; lock?: boolean } = {},
  ): Promise<string> {
    const byId = 'id' in ref;
    const deleted = opts.deletedBefore
      ? 'AND deleted_at < $3'
      : opts.deleted === 'any'
        ? ''
        : opts.deleted
          ? 'AND deleted_at IS NOT NULL'
          : 'AND deleted_at IS NULL';
    const { rows } = await tx.query(
      `SELECT id FROM credentials WHERE identity_id = $1 AND ${byId ? 'id = $2::uuid' : 'name = $2'} AND destroyed_at IS NULL ${deleted}
        ${opts.lock === false ? '' : 'FOR NO KEY UPDATE'}`,
      [identityId, byId ? ref.id : ref.name, ...(opts.deletedBefore ? [opts.deletedBefore] : [])],
    );
    if (!rows[0]) {
      const which = opts.deletedBefore ? `deleted before ${opts.deletedBefore.toISOString()} ` : opts.deleted === true ? 'deleted ' : '';
      const withheld = await withholdStored(tx, this.secrets, identityId, note.detail, refDetail(ref));
      note.unchecked.clear(); // checked: withheld if a value the caller can read, as given if not
      if (withheld.size > 0) {
        throw refWithheld(new NotFoundError(`no ${which}credential with the ${byId ? 'id' : 'name'} given (${storedValueGiven()})`));
      }
      throw new NotFoundError(`no ${which}credential with ${byId ? `id ${ref.id}` : `name '${ref.name}'`}`);
    }
    note.unchecked.clear(); // one of the caller's credentials
    note.credentialId = rows[0].id;
    return rows[0].id;
  }

  private toMeta(r: Record<string, any>): CredentialMeta {
    const iso = (d: Date | null) => (d ? d.toISOString() : null);
    return {
      id: r.id,
      identityId: r.identity_id,
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
      service: r.service,
      tags: r.tags,
      policy: r.rotation,
      dependents: r.dependents,
      notify: r.notify,
      nextRotationAt: iso(r.next_rotation_at),
      expiresAt: iso(r.expires_at),
      lastAccessedAt: iso(r.last_accessed_at),
      deletedAt: iso(r.deleted_at),
      status: r.status,
    };
  }
}

const SELECT_META = `SELECT c.*, v.created_at AS version_created_at, ${lastReadSql('c.id')} AS last_accessed_at
  FROM credentials c JOIN secret_versions v ON v.credential_id = c.id AND v.version = c.current_version`;

/** The value as sealed: a TOTP seed is kept as its otpauth URI. */
function plaintextOf(input: StoreInput): string {
  return input.kind === 'totp_seed' ? storedTotpUri(input.totp!, input.name) : input.value!;
}

/** Whether the database can take the call as a batch's parameters: one it could not would roll the whole batch back. */
function batchable(caller: Caller, input: StoreInput): boolean {
  return (
    UUID.test(caller.identityId) &&
    storable([input.name, input.kind, input.externalId ?? '', caller.actor, caller.requestId ?? '']) &&
    (input.expectedVersion === undefined || (Number.isInteger(input.expectedVersion) && input.expectedVersion >= 0 && input.expectedVersion <= INT4_MAX))
  );
}

/** How an audit row's detail names the credential a caller referred to: `name`, or an id as `ref`. */
export function refDetail(ref: CredentialRef, version?: number): Record<string, unknown> {
  return { ...('name' in ref ? { name: ref.name } : { ref: ref.id }), ...(version ? { requestedVersion: version } : {}) };
}

/** Ends every active grant of a credential (deleted or destroyed); how many there were. */
async function revokeGrants(tx: Db, credentialId: string, at: Date): Promise<number> {
  const { rowCount } = await tx.query('UPDATE grants SET revoked_at = $2 WHERE credential_id = $1 AND revoked_at IS NULL', [credentialId, at]);
  return rowCount ?? 0;
}
