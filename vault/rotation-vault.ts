import type { Pool } from '../db/pool';
import { NotFoundError, UnprocessableError, VersionConflictError } from '../core/errors';
import { audited, type AuditNote } from './audited';
import { appendAudit } from './audit';
import type { SecretStore } from './secret-store';
import type { Caller, DependentSpec, RotationPolicy } from './types';

/** A rotation's copy of its credential's policy (null: none, the default applies) and dependents. */
export interface PlannedPolicy {
  policy: RotationPolicy | null;
  dependents: DependentSpec[];
}

/**
 * The vault as a rotation sees it: versions move between the pending, current and previous
 * labels, and values are read only by the activity that hands them to a provider or dependent.
 * Every step is idempotent, so a retried or replayed activity changes nothing twice.
 */
export interface RotationSecret {
  version: number;
  value: string;
  externalId: string | null;
}

export class RotationVault {
  constructor(
    private readonly pool: Pool,
    private readonly secrets: SecretStore,
    private readonly clock: () => Date = () => new Date(),
  ) {}

  /**
   * An attempt's undo gives up its create, then asks whether that create may have been sent; the
   * create, once it has read the current value for the provider (an audit row naming its key), asks
   * whether it was given up before it sends. Each writes before it asks, so of a create that is
   * late (still running when its undo came) either the undo learns it may have been sent, and looks
   * for what it made, or the create learns it was given up, and sends nothing.
   */
  async giveUpCreate(caller: Caller, credentialId: string, rotationKey: string): Promise<void> {
    await appendAudit(this.pool, {
      identityId: caller.identityId,
      actor: caller.actor,
      action: 'rotation.create_given_up',
      credentialId,
      outcome: 'ok',
      requestId: caller.requestId,
      detail: { rotationKey },
    });
  }

  /**
   * The policy and dependents a rotation run works with, taken from the credential when it plans
   * (rotation_plans): every later step uses them, whatever the credential says by then. Planned
   * again (the activity retried, a run continued as new under the same rotation), the copy is taken again.
   */
  async planPolicy(ids: { workflowId: string; rotationId: string; identityId: string; credentialId: string }): Promise<PlannedPolicy> {
    const { rows } = await this.pool.query(
      `INSERT INTO rotation_plans (workflow_id, rotation_id, credential_id, rotation, dependents)
       SELECT $1, $2, id, rotation, dependents FROM credentials WHERE id = $3 AND identity_id = $4 AND destroyed_at IS NULL
       ON CONFLICT (workflow_id, rotation_id) DO UPDATE SET rotation = EXCLUDED.rotation, dependents = EXCLUDED.dependents, planned_at = now()
       RETURNING rotation, dependents`,
      [ids.workflowId, ids.rotationId, ids.credentialId, ids.identityId],
    );
    if (!rows[0]) throw new NotFoundError(`no credential with id ${ids.credentialId}`);
    return { policy: rows[0].rotation, dependents: rows[0].dependents };
  }

  /** The policy and dependents the run planned with; undefined for a run that planned before they were kept. */
  async plannedPolicy(ids: { workflowId: string; rotationId: string }): Promise<PlannedPolicy | undefined> {
    const { rows } = await this.pool.query('SELECT rotation, dependents FROM rotation_plans WHERE workflow_id = $1 AND rotation_id = $2', [ids.workflowId, ids.rotationId]);
    return rows[0] ? { policy: rows[0].rotation, dependents: rows[0].dependents } : undefined;
  }

  /** Whether the undo of the attempt whose create key this is has given the create up. */
  async createGivenUp(credentialId: string, rotationKey: string): Promise<boolean> {
    const { rowCount } = await this.pool.query(
      `SELECT 1 FROM audit_log WHERE credential_id = $1 AND action = 'rotation.create_given_up' AND detail->>'rotationKey' = $2 LIMIT 1`,
      [credentialId, rotationKey],
    );
    return Boolean(rowCount);
  }

  /**
   * Whether a provider's create under `rotationKey` may have been sent: the create reads the current
   * value for the provider first, and that read's audit row names the key. (A read recorded before
   * rows named their key counts too, for any key of its rotation.) See giveUpCreate.
   */
  async createMayHaveRun(credentialId: string, rotationId: string, rotationKey: string): Promise<boolean> {
    const { rowCount } = await this.pool.query(
      `SELECT 1 FROM audit_log
        WHERE credential_id = $1 AND action = 'rotation.read' AND outcome = 'ok' AND detail->>'purpose' = 'provider.create'
          AND (detail->>'rotationKey' = $3 OR (NOT detail ? 'rotationKey' AND request_id = $2))
        LIMIT 1`,
      [credentialId, rotationId, rotationKey],
    );
    return Boolean(rowCount);
  }

  /** The version a rotation created under `rotationKey`, if that step already ran. */
  async findStaged(credentialId: string, rotationKey: string): Promise<{ version: number; basedOn: number } | undefined> {
    const { rows } = await this.pool.query('SELECT version, based_on FROM secret_versions WHERE credential_id = $1 AND rotation_key = $2', [
      credentialId,
      rotationKey,
    ]);
    return rows[0] ? { version: rows[0].version, basedOn: rows[0].based_on } : undefined;
  }

  /**
   * Stores a provider's new secret as the pending version. Idempotent under `rotationKey`. A pending
   * version left by an earlier, abandoned rotation is replaced rather than blocking this one.
   * `expiresAt` is the new value's expiry if the provider gave one; it becomes the credential's on
   * promotion (a new value has no known expiry otherwise: the old value's does not carry over).
   */
  stagePending(caller: Caller, credentialId: string, rotationKey: string, created: { value: string; externalId?: string | null; expiresAt?: string | Date | null }) {
    return audited(this.pool, caller, 'rotation.create_pending', { rotationKey }, async (tx, note) => {
      note.credentialId = credentialId;
      const cred = await lock(tx, caller.identityId, credentialId);
      const done = await tx.query('SELECT version, based_on FROM secret_versions WHERE credential_id = $1 AND rotation_key = $2', [credentialId, rotationKey]);
      if (done.rows[0]) {
        note.detail.version = done.rows[0].version;
        note.detail.replayed = true;
        return { version: done.rows[0].version as number, basedOn: done.rows[0].based_on as number };
      }
      const max = await tx.query('SELECT coalesce(max(version), 0) AS v FROM secret_versions WHERE credential_id = $1', [credentialId]);
      const version = Number(max.rows[0].v) + 1;
      await this.secrets.insert(tx, caller.identityId, credentialId, version, created.value, {
        rotationKey,
        basedOn: cred.current_version,
        providerRef: created.externalId ?? null,
      });
      if (created.expiresAt) {
        await tx.query('UPDATE secret_versions SET expires_at = $3 WHERE credential_id = $1 AND version = $2', [credentialId, version, created.expiresAt]);
        note.detail.expiresAt = new Date(created.expiresAt).toISOString();
      }
      await tx.query(`UPDATE credentials SET pending_version = $2, status = 'rotating', updated_at = $3 WHERE id = $1`, [credentialId, version, this.clock()]);
      note.detail.version = version;
      if (cred.pending_version) note.detail.replacedPending = cred.pending_version;
      return { version, basedOn: cred.current_version as number };
    });
  }

  /** Reads a version for a provider or dependent (audited: the value leaves the vault for them). */
  read(caller: Caller, credentialId: string, version: number, purpose: string, detail: Record<string, unknown> = {}): Promise<RotationSecret> {
    return audited(this.pool, caller, 'rotation.read', { version, purpose, ...detail }, async (tx, note) => {
      note.credentialId = credentialId;
      // Under a share lock on the credential, until the audit row commits: a destroy (which locks the
      // row, then looks for a provider.create read it did not check for) either sees this read or
      // is waited for, and then this read finds the credential destroyed (see Vault.destroy).
      const { rows } = await tx.query(
        `SELECT c.name, v.version, v.data_key_id, v.sealed, v.provider_ref
           FROM credentials c JOIN secret_versions v ON v.credential_id = c.id AND v.version = $3
          WHERE c.id = $1 AND c.identity_id = $2 AND c.destroyed_at IS NULL
            FOR SHARE OF c`,
        [credentialId, caller.identityId, version],
      );
      if (!rows[0]) throw new NotFoundError(`version ${version} of credential ${credentialId} does not exist`);
      const value = await this.secrets.open(tx, caller.identityId, credentialId, rows[0].name, rows[0]);
      return { version, value, externalId: rows[0].provider_ref };
    });
  }

  /**
   * pending → current, current → previous. Idempotent; refuses if a newer value was stored meanwhile.
   * The expiry follows the value (the schema's trigger, see the expiry_per_version migration): the
   * old value keeps its own, the credential takes the new value's (none unless its provider gave one),
   * so a credential rotated because it was expiring is next due at the end of its period.
   */
  promote(caller: Caller, credentialId: string, version: number) {
    return audited(this.pool, caller, 'rotation.promote', { version }, async (tx, note) => {
      note.credentialId = credentialId;
      const cred = await lock(tx, caller.identityId, credentialId);
      if (cred.current_version === version) {
        note.detail.replayed = true;
        return { current: version, previous: cred.previous_version as number | null };
      }
      const based = await tx.query('SELECT based_on, promoted_at, rotation_key FROM secret_versions WHERE credential_id = $1 AND version = $2', [credentialId, version]);
      // A retry whose first attempt committed (its answer lost with a worker), after values were
      // stored on top: refusing would make the workflow undo a rotation that took effect. (The
      // previous label tells for versions promoted before promoted_at was recorded.)
      if (cred.pending_version !== version && (based.rows[0]?.promoted_at || (cred.previous_version === version && cred.pending_version === null))) {
        note.detail.replayed = true;
        note.detail.supersededBy = cred.current_version;
        return { current: version, previous: (based.rows[0]?.based_on as number | null) ?? null };
      }
      if (cred.pending_version !== version) throw new UnprocessableError(`version ${version} of credential ${credentialId} is not pending`);
      const given = await createGiven(tx, credentialId, based.rows[0]?.rotation_key);
      if (based.rows[0]?.based_on !== cred.current_version || (given !== undefined && given !== cred.current_version)) {
        throw new VersionConflictError(
          `credential ${credentialId} moved to version ${cred.current_version} while version ${version} was pending`,
          cred.current_version,
        );
      }
      const promoted = await tx.query(
        `UPDATE credentials SET previous_version = current_version, current_version = $2, pending_version = NULL,
                status = 'active', updated_at = $3 WHERE id = $1 RETURNING expires_at`,
        [credentialId, version, this.clock()],
      );
      await tx.query('UPDATE secret_versions SET promoted_at = $3 WHERE credential_id = $1 AND version = $2', [credentialId, version, this.clock()]);
      noteExpiry(note, cred.expires_at, promoted.rows[0].expires_at);
      return { current: version, previous: cred.current_version as number };
    });
  }

  /**
   * Rollback during the grace period: the previous version is current again (with its expiry), the
   * rotated one becomes previous. With `from` (the version the rotation replaced), a repeat is told
   * from a value stored since: only `from` current with the rotated one previous is this rollback
   * done already; a newer current version is a conflict, and nothing changes.
   */
  rollback(caller: Caller, credentialId: string, rotatedVersion: number, from?: number) {
    return audited(this.pool, caller, 'rotation.rollback', { version: rotatedVersion }, async (tx, note) => {
      note.credentialId = credentialId;
      const cred = await lock(tx, caller.identityId, credentialId);
      if (cred.current_version !== rotatedVersion) {
        if (cred.previous_version === rotatedVersion && (from === undefined || cred.current_version === from)) {
          note.detail.replayed = true;
          return { current: cred.current_version as number, abandoned: rotatedVersion };
        }
        throw new VersionConflictError(
          `credential ${credentialId} is at version ${cred.current_version}, not the rotated ${rotatedVersion}: a value stored since is current, so there is nothing to roll back`,
          cred.current_version,
        );
      }
      if (!cred.previous_version) throw new UnprocessableError(`credential ${credentialId} has no previous version to roll back to`);
      const revoked = await tx.query('SELECT revoked_at FROM secret_versions WHERE credential_id = $1 AND version = $2', [credentialId, cred.previous_version]);
      if (revoked.rows[0]?.revoked_at) throw new UnprocessableError(`version ${cred.previous_version} was already revoked; rollback is no longer possible`);
      const restored = await tx.query(
        `UPDATE credentials SET current_version = previous_version, previous_version = current_version, status = 'active', updated_at = $2 WHERE id = $1
         RETURNING expires_at`,
        [credentialId, this.clock()],
      );
      noteExpiry(note, cred.expires_at, restored.rows[0].expires_at);
      return { current: cred.previous_version as number, abandoned: rotatedVersion };
    });
  }

  /** Compensation: drops the pending label (the row stays for the audit trail) and records the outcome. */
  /** `kept`: the version is left working at the provider (a dependent not put back may use it), said in the audit row. */
  discardPending(caller: Caller, credentialId: string, version: number | null, status: 'active' | 'rotation_failed', kept = false) {
    return audited(this.pool, caller, 'rotation.discard_pending', { version, status, ...(kept ? { kept: true } : {}) }, async (tx, note) => {
      note.credentialId = credentialId;
      await lock(tx, caller.identityId, credentialId);
      await tx.query(
        `UPDATE credentials SET pending_version = CASE WHEN pending_version = $2 THEN NULL ELSE pending_version END,
                status = $3, updated_at = $4 WHERE id = $1`,
        [credentialId, version, status, this.clock()],
      );
    });
  }

  /**
   * Records that a version was revoked at the provider. Idempotent: a version recorded revoked
   * already (a revoke retried after its commit, its answer lost) keeps its time, and the repeat's
   * audit row says `replayed`, as a repeated stage or promote does, not a second revocation.
   */
  markRevoked(caller: Caller, credentialId: string, version: number) {
    return audited(this.pool, caller, 'rotation.revoke', { version }, async (tx, note) => {
      note.credentialId = credentialId;
      await lock(tx, caller.identityId, credentialId);
      const { rows } = await tx.query(
        `UPDATE secret_versions n SET revoked_at = coalesce(n.revoked_at, $3)
           FROM secret_versions o WHERE o.credential_id = n.credential_id AND o.version = n.version AND n.credential_id = $1 AND n.version = $2
         RETURNING o.revoked_at IS NOT NULL AS earlier`,
        [credentialId, version, this.clock()],
      );
      if (rows[0]?.earlier) note.detail.replayed = true;
    });
  }
}

/** Records in the audit row how a change of version moved the credential's expiry (never secret). */
function noteExpiry(note: AuditNote, before: Date | null, after: Date | null): void {
  if (before?.getTime() === after?.getTime()) return;
  note.detail.expiresAt = { before: before?.toISOString() ?? null, after: after?.toISOString() ?? null };
}

async function lock(tx: { query: Pool['query'] }, identityId: string, credentialId: string) {
  const { rows } = await tx.query('SELECT * FROM credentials WHERE id = $1 AND identity_id = $2 AND destroyed_at IS NULL FOR NO KEY UPDATE', [
    credentialId,
    identityId,
  ]);
  if (!rows[0]) throw new NotFoundError(`no credential with id ${credentialId}`);
  return rows[0];
}

/**
 * The version the provider's create was given as current (its audited read, the last under the
 * version's rotation key); undefined where there is none (a version staged without one). `based_on` is the version
 * current when the created value was staged: a value stored while the create ran is that, and the
 * new value, made from the one before it, must not be promoted over it. (The pending version stays
 * based on the stored value: an undo puts the dependents and the provider on it.)
 */
async function createGiven(tx: { query: Pool['query'] }, credentialId: string, rotationKey: string | null | undefined): Promise<number | undefined> {
  if (!rotationKey) return undefined;
  const { rows } = await tx.query(
    `SELECT (detail->>'version')::int AS version FROM audit_log
      WHERE credential_id = $1 AND action = 'rotation.read' AND outcome = 'ok' AND detail->>'purpose' = 'provider.create' AND detail->>'rotationKey' = $2
      ORDER BY seq DESC LIMIT 1`,
    [credentialId, rotationKey],
  );
  return rows[0]?.version as number | undefined;
}
