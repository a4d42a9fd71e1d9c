import { WorkflowNotFoundError, type Client } from '@temporalio/client';
import { AppError, NotFoundError, UnavailableError } from '../core/errors';
import { withTransaction, type Db, type Pool } from '../db/pool';
import { abandonMail, queueMail, startDelivery } from '../mail/outbox';
import { appendAudit, type AuditEntry } from '../vault/audit';
import { leakSignal } from '../workflows/definitions';
import type { rotateCredential } from '../workflows/rotate-credential';
import type { RotationIds } from '../workflows/types';
import type { ActivityDeps } from './index';
import { heartbeat, incidentMailId, stableUuid, warn } from './support';

/** The workflow that rotates a credential (one at a time). */
export const rotationWorkflowId = (credentialId: string) => `rotate:${credentialId}`;

/** The leak of another version than its incident's, as the run hears it: one id per incident and version, so a repeated report is one signal. */
export const versionLeakId = (incidentId: string, version: number) => stableUuid(`${incidentId}:version:${version}`);

/**
 * Starts the credential's rotation in leak mode for an incident (or, one running, signals it) and
 * records the run on the incident's rotation. Safe to repeat: a run hears an incident once.
 * `leftOver`: a version an earlier incident left live, for this run to revoke too. `onlyRunning`:
 * for a credential that is not rotated (deleted, or without a rotation policy) but whose rotation
 * was running when the report looked: that run is signalled, and none is started: false when it
 * has ended since (a leak run started for it would fail at its first step, its emails saying
 * rotating, then failed).
 */
export async function startLeakRun(
  deps: { pool: Pool; client: Client; taskQueue: string },
  t: { credentialId: string; identityId: string },
  rotationId: string,
  incidentId: string,
  version: number,
  leftOver?: number,
  onlyRunning = false,
): Promise<boolean> {
  const signaledRunId = onlyRunning ? await signalRunning(deps.client, t.credentialId, incidentId, version, leftOver) : await signalOrStart(deps, t, rotationId, incidentId, version, leftOver);
  if (signaledRunId === undefined) return false;
  await deps.pool.query('UPDATE rotation_runs SET run_id = $2 WHERE rotation_id = $1 AND run_id IS NULL', [rotationId, signaledRunId]);
  return true;
}

/** Signals the credential's rotation in leak mode, starting it if none runs; the run signalled. */
async function signalOrStart(
  deps: { client: Client; taskQueue: string },
  t: { credentialId: string; identityId: string },
  rotationId: string,
  incidentId: string,
  version: number,
  leftOver?: number,
): Promise<string> {
  try {
    const handle = await deps.client.workflow.signalWithStart<typeof rotateCredential, [{ incidentId: string; version?: number }]>('rotateCredential', {
      taskQueue: deps.taskQueue,
      workflowId: rotationWorkflowId(t.credentialId),
      args: [{ rotationId, identityId: t.identityId, credentialId: t.credentialId, mode: 'leak', ...(leftOver !== undefined ? { leakedVersions: [leftOver] } : {}) }],
      signal: leakSignal,
      signalArgs: [{ incidentId, version }],
    });
    // A run already going took the signal, not the input: it hears the left-over version as a report of its own.
    if (leftOver !== undefined) await handle.signal(leakSignal, { incidentId: versionLeakId(incidentId, leftOver), version: leftOver });
    return handle.signaledRunId;
  } catch {
    throw new UnavailableError('the leak rotation could not be started (Temporal is unavailable); report again shortly');
  }
}

/** Signals the credential's rotation if a run of it is going, by that run's id; undefined when none is (or it ended meanwhile). */
async function signalRunning(client: Client, credentialId: string, incidentId: string, version: number, leftOver?: number): Promise<string | undefined> {
  try {
    const running = await client.workflow.getHandle(rotationWorkflowId(credentialId)).describe();
    if (running.status.name !== 'RUNNING') return undefined;
    // That run, by its id: one ended meanwhile is not found (nor a later one signalled in its stead).
    const run = client.workflow.getHandle(running.workflowId, running.runId);
    await run.signal(leakSignal, { incidentId, version });
    if (leftOver !== undefined) await run.signal(leakSignal, { incidentId: versionLeakId(incidentId, leftOver), version: leftOver });
    return running.runId;
  } catch (err) {
    if (err instanceof WorkflowNotFoundError) return undefined;
    throw new UnavailableError('the leak could not be passed to the running rotation (Temporal is unavailable); report again shortly');
  }
}

/** What telling of a leak needs: who hears of it, and the outbox. */
export interface LeakNoticeDeps {
  pool: Pool;
  securityNotify?: string[];
}

/**
 * What a leak's email says of the credential, and who hears of it: the security contacts, its
 * owners and its identity's email. From its row, which a destroy keeps (its versions gone): a
 * destroyed credential's leak is told too (vault.describe refuses one).
 */
export async function toldOfLeak(deps: LeakNoticeDeps, t: { credentialId: string; identityId: string }) {
  const { rows } = await deps.pool.query(
    `SELECT c.name, c.kind, c.owners, c.deleted_at, c.destroyed_at, i.email
       FROM credentials c JOIN identities i ON i.id = c.identity_id WHERE c.id = $1 AND c.identity_id = $2`,
    [t.credentialId, t.identityId],
  );
  const row = rows[0];
  if (!row) throw new NotFoundError(`no credential with id ${t.credentialId}`);
  const iso = (d: Date | null) => (d ? d.toISOString() : null);
  const meta = { name: row.name as string, kind: row.kind as string, owners: row.owners as string[], deletedAt: iso(row.deleted_at), destroyedAt: iso(row.destroyed_at) };
  return { meta, to: [...new Set([...(deps.securityNotify ?? []), ...meta.owners, ...(row.email ? [row.email as string] : [])])] };
}

/**
 * Queues the email telling of a leak of a version that nothing will rotate: a soft-deleted
 * credential's (Mailgent does not rotate a deleted credential, and a delete revokes nothing at the
 * provider), or one without a rotation policy (no provider knows where it was issued; a rotation
 * would store a random value in its place and call the leaked one revoked while it still worked).
 * To the security contacts, the owners and the identity; once per version (and, deleted, per
 * deletion: deleted again after a restore, it is told again), and once a day again while the last
 * such email was given up on (undelivered). Its id, for its delivery to be started (again: on every
 * report while it is queued); undefined when there is no one to tell.
 */
export async function queueUnrotatedNotice(
  deps: LeakNoticeDeps,
  t: { credentialId: string; identityId: string; version: number; deleted: boolean },
  report: { source: string; details?: string },
  who: Reporter,
): Promise<string | undefined> {
  const { meta, to } = await toldOfLeak(deps, t);
  if (to.length === 0) return undefined;
  const seed = t.deleted ? `leak-deleted:${t.credentialId}:${t.version}:${meta.deletedAt}` : `leak-no-policy:${t.credentialId}:${t.version}`;
  let mailId = stableUuid(seed);
  const earlier = await deps.pool.query('SELECT status FROM mail_outbox WHERE id = $1', [mailId]);
  if (earlier.rows[0]?.status === 'abandoned') mailId = stableUuid(`${seed}:${new Date().toISOString().slice(0, 10)}`);
  const why = meta.destroyedAt
    ? [
        `The credential was destroyed on ${meta.destroyedAt.slice(0, 10)}: Mailgent holds no version of it any more, and destroying it`,
        'revoked nothing where it was issued, so the leaked value may still work there: revoke it there by hand.',
      ]
    : t.deleted
    ? [
        `The credential was deleted${meta.deletedAt ? ` on ${meta.deletedAt.slice(0, 10)}` : ''}, so Mailgent does not rotate it, and the leaked`,
        'value may still work where it was issued: revoke it there by hand. Or restore the credential',
        `(POST /v1/credentials/${t.credentialId}/restore) and report the leak again to have it rotated.`,
      ]
    : meta.kind === 'totp_seed'
      ? [
          'It is a TOTP seed: no provider makes them, so Mailgent cannot rotate it, and codes from the leaked',
          'seed still work: enrol a new seed with its service (which retires the old one) and store it with vault.store.',
        ]
      : [
          'It has no rotation policy, so Mailgent cannot rotate it, and the leaked value still works where it',
          'was issued: revoke it there by hand and store its replacement with vault.store. Or give it a rotation',
          `policy (PATCH /v1/credentials/${t.credentialId}) and report the leak again to have it rotated.`,
        ];
  await withTransaction(deps.pool, async (tx) => {
    const queued = await queueMail(tx, {
      id: mailId,
      identityId: t.identityId,
      purpose: 'leak.incident',
      to,
      subject: `[mailgent] SECURITY: leak reported for ${meta.name} (${meta.destroyedAt ? 'destroyed' : t.deleted ? 'deleted' : 'no rotation policy'}; not rotated)`,
      text: [
        `A leak of the ${meta.kind} credential '${meta.name}' (version ${t.version}) was reported by ${report.source}.`,
        ...(report.details ? ['', `Details: ${report.details}`] : []),
        '',
        ...why,
        '',
        `Credential id: ${t.credentialId}`,
      ].join('\n'),
    });
    const notRotated = t.deleted ? 'deleted' : 'no-policy';
    if (queued) await appendAudit(tx, { ...who, identityId: t.identityId, action: 'mail.send', credentialId: t.credentialId, outcome: 'ok', detail: { messageId: mailId, purpose: 'leak.incident', notRotated } });
  });
  return mailId;
}

/** Who reported a leak, with the request's id and interface (REST or MCP) when it came through one: its rows carry them. */
export type Reporter = Pick<AuditEntry, 'actor' | 'requestId' | 'via'>;

/**
 * Closes an incident no run will answer (its credential is not rotated), while it is still open and
 * no run is recorded on its rotation (a parallel report's signal had it heard: false). Its email,
 * which says the credential is being rotated, is not sent if it has not been, and its rotation
 * reads as cancelled before it started.
 */
export async function closeUnanswered(db: Db, incidentId: string, rotationId: string | null, why: string): Promise<boolean> {
  const { rowCount } = await db.query(
    `UPDATE leak_incidents i SET status = 'closed', closed_at = now() WHERE i.id = $1 AND i.status = 'open'
        AND NOT EXISTS (SELECT 1 FROM rotation_runs r WHERE r.rotation_id = $2 AND r.credential_id = i.credential_id AND r.run_id IS NOT NULL)`,
    [incidentId, rotationId],
  );
  if (!rowCount) return false;
  await abandonMail(db, incidentMailId(incidentId), why);
  if (rotationId) await db.query('UPDATE rotations SET cancelled_at = coalesce(cancelled_at, now()) WHERE id = $1', [rotationId]);
  return true;
}

/**
 * How a credential `c` stands for a leak, the one definition every activity that asks reads:
 * `deleted` (soft-deleted or destroyed: a destroy sets deleted_at too) and `unmanaged` (no rotation
 * policy). Either one is not rotated: its leak is told (queueUnrotatedNotice), not rotated.
 */
const CREDENTIAL_STANDING = `(c.deleted_at IS NOT NULL OR c.destroyed_at IS NOT NULL) AS deleted, c.rotation IS NULL AS unmanaged`;

/**
 * What an incident of a credential that is not rotated needs to be told without a rotation, over
 * `leak_incidents i JOIN credentials c`: the version it names (an incident from before versions were
 * recorded: the current one), the version a left-over incident handed it if still live
 * (`left_over_live`), and how the credential stands now (CREDENTIAL_STANDING).
 */
export const UNROTATED_INCIDENT_COLUMNS = `i.id, i.rotation_id, i.source, coalesce(i.version, c.current_version) AS told_version,
  (SELECT lv.version FROM secret_versions lv WHERE lv.credential_id = i.credential_id AND lv.version = i.left_over AND lv.revoked_at IS NULL) AS left_over_live,
  ${CREDENTIAL_STANDING}`;

/**
 * Tells a leak of a version that nothing will rotate (queueUnrotatedNotice) and hands its email to
 * its delivery (where there is a Temporal client): what answerUnrotated and tellUnrotatedLeaks share.
 */
async function tellUnrotated(
  deps: LeakNoticeDeps & { temporal?: { client: Client; taskQueue: string } },
  t: { credentialId: string; identityId: string; version: number; deleted: boolean },
  report: { source: string },
  actor: string,
): Promise<void> {
  const mailId = await queueUnrotatedNotice(deps, t, report, { actor });
  if (mailId && deps.temporal) await startDelivery(deps.pool, deps.temporal, mailId);
}

/** An incident as UNROTATED_INCIDENT_COLUMNS reads it. */
export interface UnrotatedIncident {
  id: string;
  rotation_id: string | null;
  source: string;
  told_version: number;
  left_over_live: number | null;
  deleted: boolean;
  unmanaged: boolean;
}

/**
 * Answers an incident no run will answer (its credential not rotated now) where a report of it now
 * would: its leak told (queueUnrotatedNotice, handed for delivery), then the incident closed unsent
 * (closeUnanswered, in `tx`). Both repeat safely, told first: a retry after a crash finds it open and
 * tells it again, once. Whether it closed it (false: heard by a run meanwhile, left to that run).
 */
export async function answerUnrotated(
  deps: LeakNoticeDeps & { temporal?: { client: Client; taskQueue: string } },
  tx: Db,
  t: { credentialId: string; identityId: string },
  incident: UnrotatedIncident,
  actor: string,
  why: string,
): Promise<boolean> {
  await tellUnrotated(deps, { ...t, version: incident.told_version, deleted: incident.deleted }, { source: incident.source }, actor);
  // The version a left-over incident handed it, still live: told too (nothing else would revoke it).
  if (incident.left_over_live !== null && incident.left_over_live !== incident.told_version) {
    await tellUnrotated(deps, { ...t, version: incident.left_over_live, deleted: incident.deleted }, { source: incident.source }, actor);
  }
  return closeUnanswered(tx, incident.id, incident.rotation_id, why);
}

/**
 * An open incident whose run is not running, and whose run was never recorded as started, is left
 * over (its starter died) only once it is older than this: a run is started within moments of its
 * incident's commit. One whose run was started is left over as soon as no run is running.
 */
export const STALE_INCIDENT_SECONDS = 60;

/** Incidents a sweep starts at most (the next sweep starts the rest). */
const RESUMED_PER_SWEEP = 200;

export function leakActivities(deps: ActivityDeps) {
  return {
    /**
     * Whether the credential is rotated now: not deleted (nor destroyed), and with a rotation policy
     * (CREDENTIAL_STANDING, as a report of it now reads it). A run asks before it rotates the
     * credential again for a leak (see UNROTATED_LEAKS_TOLD): a run started for one that is not
     * would fail at its plan. `current`: its current version (null: no such credential).
     */
    async rotatedNow(ids: RotationIds): Promise<{ rotated: boolean; current: number | null }> {
      const { rows } = await deps.pool.query(`SELECT c.current_version, ${CREDENTIAL_STANDING} FROM credentials c WHERE c.id = $1 AND c.identity_id = $2`, [
        ids.credentialId,
        ids.identityId,
      ]);
      const row = rows[0] as { current_version: number; deleted: boolean; unmanaged: boolean } | undefined;
      return { rotated: row !== undefined && !row.deleted && !row.unmanaged, current: row?.current_version ?? null };
    },

    /**
     * Tells of the leaked `versions` that are still live (none given: nothing is told), of a
     * credential that is not rotated now (rotatedNow), as a report of them now would
     * (queueUnrotatedNotice: the security contacts, the owners and the identity; a deleted
     * credential's "revoke it by hand, or restore it and report again"), each handed to its delivery:
     * the run that heard of them cannot answer them by rotating again. Once per version (and
     * deletion), however often it is asked. The report named is the latest of the incidents the run
     * heard (`heard`). `told`: the versions told (those still live).
     */
    async tellUnrotatedLeaks(ids: RotationIds & { versions: number[]; heard: string[] }): Promise<{ told: number[] }> {
      if (ids.versions.length === 0) return { told: [] };
      const { rows } = await deps.pool.query(
        `SELECT v.version, ${CREDENTIAL_STANDING}
           FROM credentials c JOIN secret_versions v ON v.credential_id = c.id
          WHERE c.id = $1 AND c.identity_id = $2 AND v.revoked_at IS NULL AND v.version = ANY($3::int[])
          ORDER BY v.version`,
        [ids.credentialId, ids.identityId, ids.versions],
      );
      if (rows.length === 0) return { told: [] };
      const reported = await deps.pool.query(
        `SELECT source FROM leak_incidents WHERE credential_id = $1 ORDER BY (id::text = ANY($2::text[])) DESC, opened_at DESC LIMIT 1`,
        [ids.credentialId, ids.heard],
      );
      const source = (reported.rows[0]?.source as string | undefined) ?? 'an earlier report';
      for (const { version, deleted } of rows) {
        heartbeat();
        const t = { credentialId: ids.credentialId, identityId: ids.identityId, version: version as number, deleted: deleted as boolean };
        await tellUnrotated(deps, t, { source }, `workflow:${ids.workflowId}`);
      }
      return { told: rows.map((r) => r.version as number) };
    },

    /**
     * Open leak incidents whose rotation was never started: their report's process died (or lost
     * Temporal) between the incident's commit and the start, and its reporter, told nothing or told
     * to report again, never did. Nothing else would start them (a later report of the credential
     * would), and the leaked value would stay live with nobody told. The sweep starts each one's
     * leak rotation as its report would have (a run going meanwhile is signalled instead) and hands
     * its incident email over. Only incidents older than STALE_INCIDENT_SECONDS: a younger one's
     * report may still be starting it. One of a credential not rotated now (deleted, or its policy
     * taken away, since the report), with no run of it going, is closed unsent and its leak told as
     * a report of it now would tell it (queueUnrotatedNotice): `told`.
     */
    async resumeLeakIncidents(input: { asOf: string }): Promise<{ started: number; told: number }> {
      if (!deps.temporal) throw new Error('no Temporal client here for starting leak rotations');
      const temporal = deps.temporal;
      const { rows } = await deps.pool.query(
        `SELECT i.id FROM leak_incidents i JOIN rotation_runs r ON r.rotation_id = i.rotation_id AND r.credential_id = i.credential_id
          WHERE i.status = 'open' AND r.run_id IS NULL AND i.opened_at < $1::timestamptz - make_interval(secs => $2)
          ORDER BY i.opened_at LIMIT ${RESUMED_PER_SWEEP}`,
        [input.asOf, STALE_INCIDENT_SECONDS],
      );
      let started = 0;
      let told = 0;
      for (const { id } of rows) {
        heartbeat();
        // One incident that cannot be answered (a fault of its own, not of Temporal or the database)
        // is left for the next sweep, and the others answered: retried for ever, it held up this
        // first step of the sweep, and so every later sweep (they do not overlap).
        await withTransaction(deps.pool, async (tx) => {
          // Under the incident's row lock, read again: a report replacing it meanwhile (closing it in
          // the transaction that opens its successor, its email abandoned there) waits for this, or
          // this finds it closed and leaves it. Its credential as it is now, not as the list found it
          // (deleted, or restored, since: the list is read before up to 200 starts).
          const { rows: still } = await tx.query(
            `SELECT ${UNROTATED_INCIDENT_COLUMNS}, i.credential_id, i.identity_id, i.version, i.left_over
               FROM leak_incidents i JOIN rotation_runs r ON r.rotation_id = i.rotation_id AND r.credential_id = i.credential_id
               JOIN credentials c ON c.id = i.credential_id
              WHERE i.id = $1 AND i.status = 'open' AND r.run_id IS NULL FOR UPDATE OF i SKIP LOCKED`,
            [id],
          );
          const row = still[0];
          if (!row) return;
          // A credential that is not rotated (deleted or destroyed, or its policy taken away, since the
          // report): a run going is signalled, none started (it would fail at its first step, its
          // emails saying rotating, then failed); with none, the leak is told as its report would now.
          const unrotated = row.deleted || row.unmanaged;
          const t = { credentialId: row.credential_id, identityId: row.identity_id };
          // With the version a left-over incident it replaced handed it (its report's start failed).
          if (await startLeakRun({ pool: deps.pool, ...temporal }, t, row.rotation_id, row.id, row.version, row.left_over ?? undefined, unrotated)) {
            await startDelivery(deps.pool, temporal, incidentMailId(row.id));
            started += 1;
            return;
          }
          const why = 'its report died before the rotation started, and the credential is not rotated now; its leak was told without a rotation';
          if (await answerUnrotated(deps, tx, t, row, 'schedule:rotation-sweep', why)) told += 1;
        }).catch((err: unknown) => {
          if (!(err instanceof AppError) || err.status >= 500) throw err;
          warn('a leak incident left open could not be answered; the next sweep tries it again', { incidentId: id, error: err.message });
        });
      }
      return { started, told };
    },
  };
}
