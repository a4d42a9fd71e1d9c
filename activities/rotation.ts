import type { Dependent } from '../dependents/types';
import { type AppError, UnprocessableError } from '../core/errors';
import { registered } from '../core/registry';
import { DEFAULT_POLICY, type Provider } from '../providers';
import { DEFAULT_SYMBOLS } from '../providers/generated/schema';
import type { SecretReader } from '../providers/types';
import type { PlannedPolicy } from '../vault/rotation-vault';
import { DEFAULT_GRACE_HOURS, type CredentialMeta, type DependentSpec } from '../vault/types';
import type { NotDue, RotationIds, RotationOutcome, RotationPlan } from '../workflows/types';
import { isDatabaseUnavailable, withTransaction } from '../db/pool';
import { cancellationOf } from '../core/outbound-cancel';
import { startDelivery } from '../mail/outbox';
import { CHANGED_SINCE_SWEEP_SQL } from '../db/run-outcome';
import type { ActivityDeps } from './index';
import { answerUnrotated, UNROTATED_INCIDENT_COLUMNS, type UnrotatedIncident, versionLeakId } from './leak-runs';
import { callingRunId, externalStep, heartbeating, incidentMailId, isRefusal, onWorkerClock, permanentErrorsFail, progressSoFar, reportProgress } from './support';

export const DEFAULT_MAX_ATTEMPTS = 3;

/**
 * The steps of rotateCredential. Each takes ids and versions, opens the vault itself, hands the
 * value to the provider or dependent that needs it, and returns ids and versions again. Every step
 * is idempotent under a key derived from the rotation id, the step and the version.
 */
export function rotationActivities(deps: ActivityDeps) {
  const clock = deps.clock ?? (() => new Date());
  const caller = (ids: RotationIds) => ({ identityId: ids.identityId, actor: `workflow:${ids.workflowId}`, requestId: ids.rotationId });
  const reader = (ids: RotationIds): SecretReader => ({
    read: async (name) => (await deps.vault.get(caller(ids), { name })).value,
  });

  /**
   * The policy and dependents the run planned with (rotation_plans), not the credential's now: a
   * change made mid-rotation applies from the next one. A run planned before they were kept reads the credential's.
   */
  const planned = async (ids: RotationIds, meta: CredentialMeta): Promise<PlannedPolicy> => (await deps.rotations.plannedPolicy(ids)) ?? unplanned(meta);
  const unplanned = (meta: CredentialMeta): PlannedPolicy => ({ policy: meta.policy, dependents: meta.dependents });
  /**
   * `deleted`: a step that goes on for a deleted credential (a revoke: its old value must stop
   * working all the same). `plan`: the run's plan when the caller has it already (planRotation).
   */
  const load = async (ids: RotationIds, opts: { deleted?: boolean; plan?: PlannedPolicy } = {}) => {
    const meta = await deps.vault.describe(ids.identityId, ids.credentialId);
    if (meta.deletedAt && !opts.deleted) throw new UnprocessableError(`credential '${meta.name}' is deleted; it is not rotated`);
    const plan = opts.plan ?? (await deps.rotations.plannedPolicy(ids));
    const { policy: plannedPolicy, dependents } = plan ?? unplanned(meta);
    const policy = plannedPolicy ?? DEFAULT_POLICY;
    const provider = registered(deps.providers, policy.provider);
    if (!provider) throw new UnprocessableError(`rotation provider '${policy.provider}' is not installed on this worker`);
    // The run planned and found no policy (taken away before it planned): nothing says where its values were issued.
    return { meta, policy, provider, dependents, plannedWithoutPolicy: plan !== undefined && !plan.policy };
  };
  const providerContext = async (ids: RotationIds, meta: CredentialMeta, provider: Provider<any>, settings: Record<string, unknown>) => ({
    settings: provider.settings.parse(await withPasswordPolicy(deps, meta, provider.name, settings)),
    kind: meta.kind,
    identityId: ids.identityId,
    credentialId: ids.credentialId,
    credentialName: meta.name,
    secrets: reader(ids),
  });
  /** `known`: the credential and the run's dependents, when the caller has read them already. */
  const dependentContext = async (ids: RotationIds, index: number, known?: { meta: CredentialMeta; dependents: DependentSpec[] }) => {
    const meta = known?.meta ?? (await deps.vault.describe(ids.identityId, ids.credentialId));
    const spec = (known?.dependents ?? (await planned(ids, meta)).dependents)[index];
    const dependent: Dependent<any> | undefined = spec && registered(deps.dependents, spec.type);
    if (!spec || !dependent) throw new UnprocessableError(`dependent ${index} of '${meta.name}' is not configured on this worker`);
    return {
      dependent,
      meta,
      ctx: {
        settings: dependent.settings.parse(spec.settings ?? {}),
        identityId: ids.identityId,
        credentialId: ids.credentialId,
        credentialName: meta.name,
        secrets: reader(ids),
      },
    };
  };
  const read = (ids: RotationIds, version: number, purpose: string, detail?: Record<string, unknown>) =>
    deps.rotations.read(caller(ids), ids.credentialId, version, purpose, detail);

  return {
    /**
     * `sinceSweep` (a sweep's run, at its start): whether the credential changed since the sweep
     * began, asked again. The sweep's wave asked before starting the run, but a run of another's
     * (an agent's batch, a leak's, the last sweep's) may have ended between that check and the
     * start, which then found nothing running to join and started a second rotation. Changed (and
     * no leak incident open: a report is on its way to this run, which answers it), the run takes
     * itself out of the sweep, as the wave would have (its row deleted: not in the sweep's totals
     * or summary, left to the next sweep if still due), and is answered `notDue`: nothing planned,
     * nothing sent to the provider, no notice. Not when another batch has recorded the run as
     * its own (it joined it, and asked for a rotation). Asked of the credential, not of whether the
     * row is still there: a retry (the answer lost with its worker) answers as the first attempt did
     * (what makes a credential changed only grows), where the row, deleted by then, would have let
     * it rotate a second time.
     */
    async planRotation(ids: RotationIds & { sinceSweep?: boolean }): Promise<RotationPlan | NotDue> {
      return permanentErrorsFail(async () => {
        if (ids.sinceSweep) {
          const runId = callingRunId() ?? null;
          const { rows } = await deps.pool.query(
            `WITH changed AS (
               SELECT c.name FROM rotations ro, credentials c
                WHERE ro.id = $1 AND ro.kind = 'sweep' AND c.id = $2 AND ${CHANGED_SINCE_SWEEP_SQL}
                  AND NOT EXISTS (SELECT 1 FROM leak_incidents i WHERE i.credential_id = c.id AND i.status = 'open')
                  AND NOT EXISTS (SELECT 1 FROM rotation_runs j WHERE j.run_id = $3 AND j.rotation_id <> $1)),
             dropped AS (
               DELETE FROM rotation_runs r USING changed WHERE r.rotation_id = $1 AND r.credential_id = $2 AND (r.run_id IS NULL OR r.run_id = $3))
             SELECT name FROM changed`,
            [ids.rotationId, ids.credentialId, runId],
          );
          if (rows[0]) return { notDue: `'${rows[0].name}' changed since the sweep selected it (rotated, stored, edited or deleted meanwhile); the next sweep rotates it if it is still due` };
        }
        const plan = await deps.rotations.planPolicy(ids);
        const { meta, policy, provider, dependents } = await load(ids, { plan });
        // No provider makes TOTP seeds: a generated value is none, postgres-role makes passwords, and
        // what an http provider answers was stored as it came (no seed checked, no otpauth:// URI: after
        // promotion vault.totp refused it and vault.get returned no URI), then sent to its verify as a
        // bearer key. A seed is rotated by enrolling a new one with its service and storing it.
        if (meta.kind === 'totp_seed') {
          if (provider.name === 'generated') throw new UnprocessableError(`credential '${meta.name}' is a totp_seed; a generated value would not be a TOTP seed`);
          throw new UnprocessableError(
            `credential '${meta.name}' is a totp_seed; provider '${provider.name}' makes no TOTP seeds (enrol a new seed with its service and store it with vault.store)`,
          );
        }
        // Without a policy (taken away since the rotation was asked for: a request names only
        // credentials with one), no provider knows where the value was issued: the generated
        // provider's defaults would put a random value in its place, the real one still working.
        if (!plan.policy) throw new UnprocessableError(`credential '${meta.name}' has no rotation policy; it is not rotated (give it one, then rotate it)`);
        for (const [index, spec] of dependents.entries()) {
          if (!registered(deps.dependents, spec.type)) throw new UnprocessableError(`dependent ${index} of '${meta.name}' has unknown type '${spec.type}'`);
        }
        return {
          provider: provider.name,
          currentVersion: meta.version,
          credentialName: meta.name,
          dependents: dependents.map((d, index) => ({ index, type: d.type })),
          graceSeconds: Math.round((policy.graceHours ?? DEFAULT_GRACE_HOURS) * 3600),
          maxAttempts: policy.maxAttempts ?? DEFAULT_MAX_ATTEMPTS,
        };
      });
    },

    /** A new value from the provider, stored as pending. Attempt n of a rotation always yields the same version. */
    async createPendingVersion(ids: RotationIds & { attempt: number }): Promise<{ version: number; basedOn: number }> {
      return externalStep(async () => {
        const key = stepKey(ids, 'create', ids.attempt);
        const staged = await deps.rotations.findStaged(ids.credentialId, key);
        if (staged) return staged;
        const { meta, policy, provider } = await load(ids);
        const ctx = await providerContext(ids, meta, provider, policy.settings);
        // Its audit row, naming the key, is what tells an undo that this create may have reached the
        // provider; an undo that came first (this attempt late, still running) has given it up.
        const current = await read(ids, meta.version, 'provider.create', { rotationKey: key });
        if (await deps.rotations.createGivenUp(ids.credentialId, key)) {
          throw new UnprocessableError(`attempt ${ids.attempt} was undone before its create was sent; nothing was sent to the provider`);
        }
        const created = await heartbeating(() => provider.create({ ...ctx, idempotencyKey: key, current }));
        return deps.rotations.stagePending(caller(ids), ids.credentialId, key, created);
      });
    },

    /** `madeAt`: when the create step that made the version ended (the workflow's clock; passed on on the worker's, onWorkerClock); see Provider.verify. */
    async verifyVersion(ids: RotationIds & { version: number; madeAt?: string }): Promise<void> {
      return externalStep(async () => {
        const { meta, policy, provider } = await load(ids);
        const ctx = await providerContext(ids, meta, provider, policy.settings);
        const secret = await read(ids, ids.version, 'provider.verify');
        await heartbeating(() => provider.verify({ ...ctx, secret, ...(ids.madeAt ? { madeAt: onWorkerClock(ids.madeAt) } : {}) }));
      });
    },

    /**
     * Compensation for attempt n: the provider forgets whatever that attempt's create made (current
     * keeps working) and the vault drops the pending label. Runs even when create failed, because
     * the provider may have acted before the step failed; not when its create never reached the
     * provider (below).
     */
    /**
     * `keepLive` (the attempt's undo could not put every dependent back): a staged version is left
     * working where the provider keeps versions apart (`kept`), its pending label dropped all the
     * same; one that holds one value (a single PostgreSQL role) is put back on `current`, as before.
     */
    async discardAttempt(ids: RotationIds & { attempt: number; current: number; keepLive?: boolean }): Promise<{ kept?: true } | void> {
      return permanentErrorsFail(async () => {
        const createKey = stepKey(ids, 'create', ids.attempt);
        const staged = await deps.rotations.findStaged(ids.credentialId, createKey);
        if (!staged) {
          // An attempt whose create never reached the provider (refused before it was sent: a cancel
          // that came first, a credential deleted meanwhile) left nothing there to undo, and nothing
          // staged: the provider is not called, nor a value read for it. Before, it was asked to put
          // "back" a value it had never left (a single PostgreSQL role's password set again): with
          // the provider unreachable then, or the admin credential gone, the undo failed (retried for
          // the compensation's hour), and a run that had changed nothing ended half-undone. Given up
          // first: a create of this attempt still running (late: its undo came first) then sends
          // nothing when it gets that far (see giveUpCreate).
          await deps.rotations.giveUpCreate(caller(ids), ids.credentialId, createKey);
          if (!(await deps.rotations.createMayHaveRun(ids.credentialId, ids.rotationId, createKey))) return;
        }
        const meta = await deps.vault.describe(ids.identityId, ids.credentialId);
        const policy = (await planned(ids, meta)).policy ?? DEFAULT_POLICY;
        const provider = registered(deps.providers, policy.provider);
        // Refused as every other step refuses it: before, the provider was passed over and the
        // attempt taken as undone, with a key it may have made left working there.
        if (!provider) throw new UnprocessableError(`rotation provider '${policy.provider}' is not installed on this worker`);
        const ctx = await providerContext(ids, meta, provider, policy.settings);
        if (ids.keepLive && staged && !provider.holdsOneValue?.(ctx.settings)) {
          await deps.rotations.discardPending(caller(ids), ids.credentialId, staged.version, 'active', true);
          return { kept: true as const };
        }
        const pending = staged ? await read(ids, staged.version, 'provider.discard') : undefined;
        const idempotencyKey = stepKey(ids, 'discard', ids.attempt);
        // Put back on `current` (the version the attempt's create read, or the one a refused
        // promote named), known only for a create that staged its version. One that did not (it
        // was sent and failed, its answer lost, say: `createKey` lets the provider find what it may
        // have made) puts the provider on the vault's current version now: the workflow knew only
        // the version current when the rotation planned, and a value stored since (between two
        // attempts, say) is what consumers use.
        const currentVersion = staged ? storedSince(ids.current, meta.version, staged.version) : meta.version;
        await heartbeating(async () => {
          if (provider.discard) await provider.discard({ ...ctx, pending, current: await read(ids, currentVersion, 'provider.discard'), idempotencyKey, createKey });
          else if (pending) await provider.revoke({ ...ctx, secret: pending, idempotencyKey });
        });
        if (staged) await deps.rotations.markRevoked(caller(ids), ids.credentialId, staged.version);
        if (staged) await deps.rotations.discardPending(caller(ids), ids.credentialId, staged.version, 'active');
      });
    },

    async applyDependent(ids: RotationIds & { index: number; version: number }): Promise<void> {
      return externalStep(async () => {
        const { dependent, ctx } = await dependentContext(ids, ids.index);
        const target = await read(ids, ids.version, `dependent.${ids.index}.apply`);
        await heartbeating(() => dependent.apply({ ...ctx, target, idempotencyKey: stepKey(ids, 'apply', ids.index, ids.version) }));
      });
    },

    async verifyDependent(ids: RotationIds & { index: number; version: number }): Promise<void> {
      return externalStep(async () => {
        const { dependent, ctx } = await dependentContext(ids, ids.index);
        const target = await read(ids, ids.version, `dependent.${ids.index}.verify`);
        await heartbeating(() => dependent.verify({ ...ctx, target }));
      });
    },

    /**
     * Puts a dependent back on `version` (the one it had before this rotation), away from
     * `abandoned`. Each undone version is a restore of its own, with a key of its own: a run restores
     * the same version after every failed attempt and again on a rollback, and a receiver that
     * dedupes on the key must not take the later ones for repeats. (Runs recorded before `abandoned`
     * existed keep their key.)
     */
    async restoreDependent(ids: RotationIds & { index: number; version: number; abandoned?: number; unapplied?: boolean }): Promise<void> {
      return permanentErrorsFail(async () => {
        const { dependent, ctx, meta } = await dependentContext(ids, ids.index);
        const version = ids.abandoned === undefined ? ids.version : storedSince(ids.version, meta.version, ids.abandoned);
        const target = await read(ids, version, `dependent.${ids.index}.restore`);
        const key = ids.abandoned === undefined ? stepKey(ids, 'restore', ids.index, version) : stepKey(ids, 'restore', ids.index, version, 'from', ids.abandoned);
        await heartbeating(() => dependent.restore({ ...ctx, target, idempotencyKey: key, ...(ids.unapplied ? { unapplied: true } : {}) }));
      });
    },

    /**
     * Tells the dependents that want to know that the pending version is now current. One that
     * refuses (a permanent error) does not keep the others from being told: every refusal is
     * reported together once all were tried (before, the first ended the loop, and the dependents
     * after it never heard, with nothing saying so). The dependents done so far ride on the step's
     * heartbeats, so a retry (a transient failure, a dead worker, an attempt out of time: twenty
     * webhooks at their 60 s timeout outlast one attempt) goes on from the first not done instead of
     * telling every one again from the start.
     */
    async dependentsPromoted(ids: RotationIds & { version: number }): Promise<void> {
      // Outside the step's body: a database outage waited out reruns the body within the attempt,
      // and it must go on from where it was, not from the attempt's start. Reported before the first
      // wait, so no heartbeat of this attempt carries less than the last attempt's.
      const before = progressSoFar<{ version?: number; done?: number[]; refused?: string[] }>();
      const sameStep = before?.version === ids.version;
      const done = new Set<number>(sameStep ? (before?.done ?? []) : []);
      const refused: string[] = sameStep ? [...(before?.refused ?? [])] : [];
      let first: AppError | undefined;
      const progress = () => ({ version: ids.version, done: [...done], refused });
      reportProgress(progress);
      return externalStep(async () => {
        const meta = await deps.vault.describe(ids.identityId, ids.credentialId);
        const { dependents } = await planned(ids, meta);
        const wanted = [...dependents.entries()].filter(([, spec]) => registered(deps.dependents, spec.type)?.promoted);
        // A dependent that fails for now (down, too slow, a 5xx) does not keep the ones after it from
        // being told either: it is left not done, and the attempt fails once every other was tried,
        // so its retry tells those left alone (before, the loop ended at it: the ones after it were
        // never told, and the notice named it alone).
        const failing: { index: number; err: unknown }[] = [];
        for (const [position, [index]] of wanted.entries()) {
          if (done.has(index)) continue;
          const { dependent, ctx } = await dependentContext(ids, index, { meta, dependents });
          const target = await read(ids, ids.version, `dependent.${index}.promoted`);
          try {
            await heartbeating(() => dependent.promoted!({ ...ctx, target, idempotencyKey: stepKey(ids, 'promoted', index, ids.version) }));
          } catch (err) {
            // The activity cancelled, or the database away (waited out, from where it was): not the dependent's failure.
            if (cancellationOf() || isDatabaseUnavailable(err)) throw err;
            if (!isRefusal(err)) {
              failing.push({ index, err });
              continue;
            }
            first ??= err;
            refused.push(err.message);
          }
          done.add(index);
          // Sent now while others wait their turn (the SDK may hold it a few seconds; after the last, the step's end says it).
          if (position < wanted.length - 1) reportProgress(progress, true);
        }
        // Its retry goes on from those not done: the ones told after a failing one are sent with the failure.
        if (failing.length > 0) reportProgress(progress, true);
        // With the refusals so far named too: the last attempt's error is what the notice says.
        const alsoRefused = refused.length ? `; and ${refused.length} refused: ${refused.join('; ')}` : '';
        if (failing.length === 1 && !alsoRefused) throw failing[0]!.err;
        if (failing.length > 0) {
          const told = failing.map(({ index, err }) => `${failing.length > 1 ? `dependent ${index}: ` : ''}${err instanceof Error ? err.message : String(err)}`).join('; ');
          throw new Error(`${failing.length > 1 ? `${failing.length} dependents could not be told for now: ` : ''}${told}${alsoRefused}`);
        }
        // One refusal keeps its error (from an earlier attempt, its message).
        if (refused.length === 1) throw first ?? new UnprocessableError(refused[0]!);
        if (refused.length > 1) throw new UnprocessableError(`${refused.length} dependents refused: ${refused.join('; ')}`);
      });
    },

    async promotePendingVersion(ids: RotationIds & { version: number }): Promise<{ current: number; previous: number | null; promotedAt: string }> {
      return permanentErrorsFail(async () => ({
        ...(await deps.rotations.promote(caller(ids), ids.credentialId, ids.version)),
        promotedAt: clock().toISOString(),
      }));
    },

    /**
     * The provider stops accepting `version`; the vault records when. With `current` (a rollback,
     * where `version` was promoted and is abandoned again) the provider discards it instead, as
     * compensation does before promotion: a provider that holds one value (a single PostgreSQL role)
     * is put back on `current`, which a revoke would not do; with `currentNow` too, on the version
     * current when this runs (a value stored after the workflow learnt `current` is).
     */
    /**
     * `keepLive` (a rollback that could not put every dependent back): a provider that keeps versions
     * apart is not asked to revoke, and the version is left live (`kept`); one that holds one value
     * (discard: a single PostgreSQL role) is put back on `current` all the same, as the vault is.
     */
    async revokeVersion(ids: RotationIds & { version: number; current?: number; currentNow?: boolean; keepLive?: boolean }): Promise<{ kept?: true } | void> {
      return externalStep(async () => {
        // A credential deleted since (restorable, its versions kept) is not rotated, but the value
        // this revokes, replaced and perhaps leaked, must stop working all the same: before, the
        // revoke failed for good and the old value stayed live.
        const { meta, policy, provider, plannedWithoutPolicy } = await load(ids, { deleted: true });
        // No policy to say where the value was issued (taken away before this run planned: a leak
        // run continued from one whose credential lost it): the default provider's revoke does
        // nothing, and the version would be marked revoked while it still works. Refused: the run
        // tells it as live instead (UNROTATED_LEAKS_TOLD).
        if (plannedWithoutPolicy) {
          throw new UnprocessableError(`version ${ids.version} of credential '${meta.name}' cannot be revoked here: the credential has no rotation policy to say where it was issued; revoke it there by hand`);
        }
        const ctx = await providerContext(ids, meta, provider, policy.settings);
        // Asked of the provider (before, any provider with a discard counted as holding one value:
        // an http provider's, two PostgreSQL roles' abandoned version was revoked under the dependent).
        if (ids.keepLive && !provider.holdsOneValue?.(ctx.settings)) return { kept: true as const };
        const secret = await read(ids, ids.version, 'provider.revoke');
        const idempotencyKey = stepKey(ids, 'revoke', ids.version);
        if (ids.current !== undefined && provider.discard) {
          const version = ids.currentNow && meta.version !== ids.version ? meta.version : ids.current!;
          const current = await read(ids, version, 'provider.discard');
          await heartbeating(() => provider.discard!({ ...ctx, pending: secret, current, idempotencyKey }));
        } else {
          await heartbeating(() => provider.revoke({ ...ctx, secret, idempotencyKey }));
        }
        await deps.rotations.markRevoked(caller(ids), ids.credentialId, ids.version);
      });
    },

    /** `from`: the version the rollback makes current again (runs recorded before it send none). */
    async rollbackVersion(ids: RotationIds & { version: number; from?: number }): Promise<{ current: number; abandoned: number }> {
      return permanentErrorsFail(() => deps.rotations.rollback(caller(ids), ids.credentialId, ids.version, ids.from));
    },

    async markRotationState(ids: RotationIds & { status: 'active' | 'rotation_failed' }): Promise<void> {
      return permanentErrorsFail(() => deps.rotations.discardPending(caller(ids), ids.credentialId, null, ids.status));
    },

    /** How this run ended, keyed by its run id: batches and sweeps read it for their summaries. */
    async recordOutcome(ids: RotationIds & { outcome: RotationOutcome; fromVersion?: number; toVersion?: number; error?: string }): Promise<void> {
      const runId = callingRunId() ?? `direct:${ids.rotationId}`;
      await deps.pool.query(
        `INSERT INTO run_outcomes (run_id, workflow_id, credential_id, outcome, from_version, to_version, error)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (run_id) DO UPDATE SET outcome = $4, error = $7, finished_at = now()`,
        [runId, ids.workflowId, ids.credentialId, ids.outcome, ids.fromVersion ?? null, ids.toVersion ?? null, ids.error ?? null],
      );
    },

    /**
     * The credential's current version: a run that has revoked its previous one learns whether a
     * value stored while it ran has replaced the version it made (see SUPERSEDED_ANSWERED).
     */
    async currentVersion(ids: RotationIds): Promise<{ current: number }> {
      return permanentErrorsFail(async () => ({ current: (await deps.vault.describe(ids.identityId, ids.credentialId)).version }));
    },

    /**
     * Closes the credential's open leak incidents that the run heard (`heard`, the incident ids it
     * was signalled), and answers the open ones it did not: a report that lost Temporal before its
     * signal (answered 503) leaves its incident open, and the run that closed it would have answered
     * a leak it never heard, its value possibly still live. The run hears those now and rotates
     * again; one whose version is revoked by now (the version this run replaced, say) needs nothing
     * more and is closed, unless a left-over incident handed it a version still live (heard now, as its
     * own would be). Each incident's email goes out first, if it is still queued: the report
     * that opened the incident may have lost Temporal after starting this run and before starting
     * the email's delivery (or before its signal), and a later report would find no incident to join.
     * An unheard one of a credential not rotated now (deleted, or its policy taken away, during the
     * run) is not rotated again: told as a report of it now would tell it, and closed, its email
     * (which says it is being rotated) not sent if it has not been.
     * (Without `heard`, a run recorded before it: every open incident is closed, as then.)
     */
    async closeLeakIncidents(ids: RotationIds & { heard?: string[] }): Promise<{ unheard: { incidentId: string; version?: number }[] }> {
      const open = (
        await deps.pool.query(
          `SELECT ${UNROTATED_INCIDENT_COLUMNS}, i.version, v.revoked_at IS NOT NULL AS revoked
             FROM leak_incidents i JOIN credentials c ON c.id = i.credential_id
             LEFT JOIN secret_versions v ON v.credential_id = i.credential_id AND v.version = i.version
            WHERE i.credential_id = $1 AND i.status = 'open'`,
          [ids.credentialId],
        )
      ).rows as (UnrotatedIncident & { version: number | null; revoked: boolean })[];
      const heard = ids.heard === undefined ? undefined : new Set(ids.heard);
      // What an incident leaves live that the run never heard: its own version, and the version a
      // left-over incident handed it (its report's signal of it, under versionLeakId, lost too). Its
      // own revoked (the version this run replaced, say), the handed one may still work: closed
      // with the incident, it was a leaked value left working with no one to answer it.
      const unheardOf = (incident: (typeof open)[number]) => {
        if (!heard) return [];
        const own = !heard.has(incident.id) && !incident.revoked ? [{ incidentId: incident.id, ...(incident.version === null ? {} : { version: incident.version }) }] : [];
        const handed = incident.left_over_live;
        const handedId = handed === null ? undefined : versionLeakId(incident.id, handed);
        const left = handed !== null && handed !== incident.version && !heard.has(handedId!) ? [{ incidentId: handedId!, version: handed }] : [];
        return [...own, ...left];
      };
      let unheard = open.map((incident) => ({ incident, leaks: unheardOf(incident) })).filter(({ leaks }) => leaks.length > 0);
      // Unheard, of a credential not rotated now (deleted, or its policy taken away, during this run):
      // rotated again, it would fail at its first step, its emails saying rotating, then failed. Told
      // as a report of it now would tell it, and closed unsent (answerUnrotated): the versions left
      // live alone (its own, revoked, is not told as not rotated).
      const why = 'the rotation that would have answered it ended first, and the credential is not rotated now; its leak was told without a rotation';
      for (const entry of unheard.filter(({ incident }) => incident.deleted || incident.unmanaged)) {
        const t = { credentialId: ids.credentialId, identityId: ids.identityId };
        const [first, second] = entry.leaks.map((leak) => leak.version ?? entry.incident.told_version);
        const told = { ...entry.incident, told_version: first!, left_over_live: second ?? null };
        // (Heard by now after all, a parallel report's signal recorded on its rotation: left to the run.)
        if (await withTransaction(deps.pool, (tx) => answerUnrotated(deps, tx, t, told, `workflow:${ids.workflowId}`, why))) unheard = unheard.filter((e) => e !== entry);
      }
      if (deps.temporal) for (const { id } of open) await startDelivery(deps.pool, deps.temporal, incidentMailId(id));
      const left = new Set(unheard.map(({ incident }) => incident));
      await deps.pool.query(`UPDATE leak_incidents SET status = 'closed', closed_at = now() WHERE id = ANY($1::uuid[]) AND status = 'open'`, [
        open.filter((incident) => !left.has(incident)).map((incident) => incident.id),
      ]);
      return { unheard: unheard.flatMap(({ leaks }) => leaks) };
    },
  };
}

/**
 * The idempotency key of one step of one credential's rotation. A batch shares its rotation id
 * across credentials, so the credential id is part of every key (a provider must never see the
 * same key for two credentials).
 */
export function stepKey(ids: RotationIds, step: string, ...parts: (string | number)[]): string {
  return [ids.rotationId, ids.credentialId, step, ...parts].join(':');
}

/**
 * A managed password follows its identity's password policy: at least its length, every class it
 * requires. Both providers that make passwords: `generated` (a symbol set of letters or digits only
 * gives no symbol: the default set then) and `postgres-role` (letters and digits always, one of each).
 */
async function withPasswordPolicy(deps: ActivityDeps, meta: CredentialMeta, provider: string, settings: Record<string, unknown>) {
  if (meta.kind !== 'password' || (provider !== 'generated' && provider !== 'postgres-role')) return settings;
  const { rows } = await deps.pool.query('SELECT * FROM password_policies WHERE identity_id = $1', [meta.identityId]);
  const p = rows[0];
  if (!p) return settings;
  if (provider === 'postgres-role') {
    const s = settings as { passwordLength?: number; symbols?: boolean };
    return { ...settings, passwordLength: Math.max(s.passwordLength ?? 32, p.length), symbols: (s.symbols ?? false) || p.symbols };
  }
  const s = settings as { length?: number; lowercase?: boolean; uppercase?: boolean; digits?: boolean; symbols?: boolean; symbolSet?: string };
  const symbols = (s.symbols ?? false) || p.symbols;
  return {
    ...settings,
    length: Math.max(s.length ?? 32, p.length),
    lowercase: (s.lowercase ?? true) || p.lowercase,
    uppercase: (s.uppercase ?? true) || p.uppercase,
    digits: (s.digits ?? true) || p.digits,
    symbols,
    ...(p.symbols && s.symbolSet !== undefined && !/[^A-Za-z0-9]/.test(s.symbolSet) ? { symbolSet: DEFAULT_SYMBOLS } : {}),
  };
}

/**
 * Where an undo puts a dependent or the provider back: `target`, the version the attempt (or a
 * rollback) began from, unless a value stored by hand since is current (`current` newer than it, and
 * not the abandoned version itself): consumers are on that value now, and the vault hands it out.
 * A rollback's target is current by then (the vault rolled back first), so it is unchanged.
 */
function storedSince(target: number, current: number, abandoned: number): number {
  return current > target && current !== abandoned ? current : target;
}
