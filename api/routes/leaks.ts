import { randomUUID } from 'node:crypto';
import { Router } from 'express';
import type { z } from 'zod';
import { WorkflowNotFoundError, type Client } from '@temporalio/client';
import { closeUnanswered, queueUnrotatedNotice, type Reporter, rotationWorkflowId, STALE_INCIDENT_SECONDS, startLeakRun, toldOfLeak, versionLeakId } from '../../activities/leak-runs';
import { incidentMailId } from '../../activities/support';
import { AppError, NotFoundError, UnavailableError, UnprocessableError } from '../../core/errors';
import { idOf } from '../../core/ids';
import { latestRunOf, statusOf } from '../../core/run-chain';
import { withTransaction, type Pool } from '../../db/pool';
import { abandonMail, queueMail, startDelivery } from '../../mail/outbox';
import { findStoredValue, MIN_SCANNED_LENGTH } from '../../mail/secret-scan';
import type { Logger } from '../../core/logger';
import { appendAudit, auditChangeMade, type AuditEntry } from '../../vault/audit';
import type { SecretStore } from '../../vault/secret-store';
import type { Caller, Vault } from '../../vault/vault';
import { leakSignal } from '../../workflows/definitions';
import { endpoint, type AuthDeps } from '../endpoint';
import { ADMIN_KEY_OWNER, claimPinned, idempotencyKeyOf, keepAnswer, keyedEarlier, keyed } from '../idempotency';
import { leakResults } from '../responses';
import { leakReport } from '../schemas';

export interface LeakDeps {
  pool: Pool;
  vault: Vault;
  secrets: SecretStore;
  client: Client;
  taskQueue: string;
  securityNotify?: string[];
  /** For a report carried out whose audit row could not be written (auditChangeMade). */
  logger?: Pick<Logger, 'error'>;
}

interface Target {
  credentialId: string;
  identityId: string;
  name: string;
  version: number;
  live: boolean;
  /** Soft-deleted (restorable, not destroyed): not rotated; its leak is told to the people who can revoke it. */
  deleted: boolean;
  /**
   * No rotation policy: no provider knows where the value was issued, so nothing can revoke it there.
   * Not rotated either (a rotation would put a random value in its place, and call the leaked one
   * revoked while it still works): told, as a deleted one's leak is.
   */
  unmanaged: boolean;
  kind: string;
}

/**
 * Leak response. A report names a credential, or gives the SHA-256 of the leaked value, which is
 * matched against every stored version by its keyed fingerprint (no decryption). A version not yet
 * revoked (current, pending, previous, or older and replaced) opens one incident per credential: the security
 * contacts are mailed, and the credential's rotation is started in leak mode or, if one is
 * running, signalled to revoke the old value at once. Further reports join the open incident. A
 * live version of a soft-deleted credential, with no rotation of it running, is not rotated (deleted,
 * it is out of rotation): the security contacts and owners are told that the leaked value may still
 * work (`deleted`; reportUnrotated). Nor is one of a credential without a rotation policy (a TOTP
 * seed, say), which no provider can revoke: they are told to revoke it where it was issued (`no-policy`).
 */
export function leakRoutes(auth: AuthDeps, deps: LeakDeps): Router {
  const router = Router();
  router.post(
    '/v1/leaks',
    ...endpoint(auth, {
        who: 'identity-or-admin',
        action: 'leak.report',
        summary: 'Report a leaked credential (by name/id or the SHA-256 of the value): rotate it at once (a deleted one, or one without a rotation policy: tell its owners)',
        body: leakReport,
        responses: { 202: leakResults },
        problems: [404, 422],
      }, async ({ req, body, caller, identity }) => ({
        status: 202,
        body: await reportLeak(deps, caller, identity?.id, { ...body, idempotencyKey: idempotencyKeyOf(req.get('idempotency-key'), body.idempotencyKey) }),
      })),
  );
  return router;
}

/**
 * One leak report (POST /v1/leaks, MCP report_leak). `scope` is the reporting identity, whose own
 * credentials are the only ones it can name; undefined for the admin, who may name any.
 */
export async function reportLeak(deps: LeakDeps, caller: Caller, scope: string | undefined, input: z.output<typeof leakReport>) {
  const { idempotencyKey, ...body } = input;
  // With an Idempotency-Key, a report repeated (its answer lost) is answered as the first was, or,
  // the first's answer not kept (it failed, or died, on the way), carried out again on the versions
  // the first resolved: a report by name names the current version, so resolved again once the
  // first's rotation had ended, it would open a second incident and rotate the new value too.
  // A fingerprint (the value's plain SHA-256) goes into the key's request hash as its keyed
  // fingerprint, as a version keeps it: before, the hash kept for a day was of the plain one, so
  // whoever read the database could confirm a guessed value offline (the source is in the audit log).
  const request =
    idempotencyKey !== undefined && body.fingerprint
      ? { ...body, fingerprint: (await deps.secrets.fingerprintOfSha256(deps.pool, Buffer.from(body.fingerprint, 'hex'))).toString('hex') }
      : body;
  const key = keyed('leak.report', idempotencyKey, request);
  const owner = scope ?? ADMIN_KEY_OWNER;
  const earlier = key ? await keyedEarlier(deps.pool, owner, key) : undefined;
  const repeated = async (answer: unknown) => {
    await appendAudit(deps.pool, {
      identityId: scope ?? null,
      actor: scope ? caller.actor : 'admin',
      action: 'leak.report',
      credentialId: null,
      outcome: 'ok',
      requestId: caller.requestId,
      via: caller.via,
      detail: { source: body.source, repeated: true },
    });
    return { ...(answer as { results: LeakResult[] }), repeated: true as const };
  };
  if (earlier?.answer) return repeated(earlier.answer);
  let targets = earlier
    ? await pinnedTargets(deps, earlier.pinned as Pinned[], scope)
    : body.fingerprint
      ? await byFingerprint(deps, body.fingerprint, scope)
      : await byCredential(deps, body.credential!, body.version, scope);
  // Both free-text fields go into the audit row, the rotation's reason and the incident email (to the
  // owners, whom the reporter may set): neither may carry a value the identity can read, its own or
  // one granted to it, as mail.send refuses them. Text shorter than any value the scan matches needs
  // no decryption at all.
  const fields = (['source', 'details'] as const).filter((field) => (body[field]?.length ?? 0) >= MIN_SCANNED_LENGTH);
  for (const identityId of fields.length ? new Set(targets.map((t) => t.identityId)) : []) {
    for await (const stored of deps.vault.readableValues(identityId)) {
      for (const field of fields) {
        if (findStoredValue({ subject: '', text: body[field]! }, stored)) {
          throw new UnprocessableError(`${field} must not contain a stored value (the leaked one, or any other this identity may read); report a value by its SHA-256 fingerprint`);
        }
      }
    }
  }
  // Claimed once the report is known to be carried out (not refused): a key whose request was a
  // 404 or a 422 stays free for the request set right.
  // A repeat under the key of a report not answered yet (still going, or it failed or died on the
  // way): the same report, carried out again, so it does not count on the incident it joins (before,
  // two requests under one key at once counted two reports).
  let repeat = earlier !== undefined;
  if (key && !earlier) {
    // Another request under the key claimed it first: what it pinned is acted on, as a repeat would.
    const first = await claimPinned(deps.pool, owner, key, targets.map((t): Pinned => ({ credentialId: t.credentialId, version: t.version })));
    if (first?.answer) return repeated(first.answer);
    if (first) targets = await pinnedTargets(deps, first.pinned as Pinned[], scope);
    repeat = first !== undefined;
  }
  const results: LeakResult[] = [];
  const entry = (done: LeakResult[], extra: Record<string, unknown> = {}): AuditEntry => ({
    identityId: scope ?? null,
    actor: scope ? caller.actor : 'admin',
    action: 'leak.report',
    credentialId: targets.length === 1 ? targets[0]!.credentialId : null,
    outcome: 'ok',
    requestId: caller.requestId,
    via: caller.via,
    detail: {
      source: body.source,
      by: body.fingerprint ? 'fingerprint' : 'credential',
      // The version named as leaked, when the report named one (a fingerprint's is its target's).
      ...(body.version !== undefined ? { version: body.version } : {}),
      matched: targets.length,
      results: done.map((r) => r.action),
      ...(repeat ? { repeated: true } : {}),
      ...extra,
    },
  });
  const changed = (done: LeakResult[]) => done.some((r) => r.action !== 'already-revoked');
  const recordChange = (done: LeakResult[], extra?: Record<string, unknown>) =>
    auditChangeMade(deps, entry(done, extra), `the leak report (${done.map((r) => r.action).join(', ')})`);
  try {
    const who: Reporter = { actor: scope ? caller.actor : 'admin', requestId: caller.requestId, via: caller.via };
    for (const target of targets) results.push(await respond(deps, target, repeat ? { ...body, repeat } : body, who));
  } catch (err) {
    // Failed after a rotation had started (this target's, its incident email then not handed over;
    // or an earlier target's): the answer is still the failure (report again), but what was started
    // is a change made outside the database, and gets its ok row, as a whole report's does.
    const started = (err as { leakStarted?: LeakResult }).leakStarted;
    const made = started ? [...results, started] : results;
    if (changed(made)) await recordChange(made, { incomplete: true });
    throw err;
  }
  // A report that changed nothing (every value already revoked) has its row written as any other: a failure to is a plain 503.
  if (changed(results)) await recordChange(results);
  else await appendAudit(deps.pool, entry(results));
  // Not kept (the database lost meanwhile), a repeat carries the report out again: it joins what this one opened.
  if (key) await keepAnswer(deps.pool, owner, key, { results }).catch(() => undefined);
  return { results };
}

type LeakResult =
  | { credentialId: string; version: number; action: 'already-revoked' | 'deleted' | 'no-policy' }
  | { credentialId: string; version: number; incidentId: string; workflowId: string; rotationId?: string; action: 'joined' | 'rotating' };

/** Which of the credential's `versions` are not revoked (none asked: none). */
async function liveVersions(db: Pick<Pool, 'query'>, credentialId: string, versions: number[]): Promise<number[]> {
  if (versions.length === 0) return [];
  const { rows } = await db.query('SELECT version FROM secret_versions WHERE credential_id = $1 AND version = ANY($2::int[]) AND revoked_at IS NULL', [credentialId, versions]);
  return rows.map((r) => r.version as number);
}

/** Rolls an incident's transaction back: the version it was for was revoked since the report found it live. */
class RevokedMeanwhile extends Error {}

/**
 * Rolls an incident's transaction back: the version it was for is gone since the report found it
 * live, its credential destroyed meanwhile. A destroy revokes nothing where the value was issued:
 * the leak is told as one nothing rotates (before, a missing row read as revoked: `already-revoked`,
 * and no one was told).
 */
class DestroyedMeanwhile extends Error {}

async function respond(
  deps: LeakDeps,
  t: Target,
  /** `repeat`: a repeat under its Idempotency-Key of a report not answered yet, which does not count again on the incident it joins. */
  body: { source: string; details?: string; fingerprint?: string; version?: number; repeat?: boolean },
  /** Who reported it, and the request (its id and interface): the rows this report writes carry them. */
  who: Reporter,
  again = false,
  /** A left-over incident's version, still live, that the incident replacing it must have revoked too. */
  leftOver?: number,
  /**
   * The left-over incident this report replaces: closed in the transaction that opens its
   * replacement. `answered`: the report's answer when the incident turns out closed by its own run
   * as it ended (the leak answered) and the report is a duplicate of it.
   */
  replacing?: { id: string; newVersion: boolean; answered: () => Promise<LeakResult> },
): Promise<LeakResult> {
  const workflowId = rotationWorkflowId(t.credentialId);
  if (!t.live) return { credentialId: t.credentialId, version: t.version, action: 'already-revoked' as const };
  // A deleted credential's rotation still running (a delete does not stop one: in its grace period,
  // say) hears of the leak as any other does, and revokes the leaked value at once; with none
  // running, nothing rotates it. The same for one whose policy was taken away during its rotation.
  if ((t.deleted || t.unmanaged) && !(await rotationRunning(deps, workflowId))) return reportUnrotated(deps, t, body, who);

  const rotationId = randomUUID();
  const newIncidentId = randomUUID();
  const mailId = incidentMailId(newIncidentId);
  const { meta, to } = await toldOfLeak(deps, t);
  // Not rotated (deleted, or without a policy), its rotation running when looked at above: that run
  // is signalled, none started. Ended meanwhile, the incident is closed before its email leaves
  // (its run never started, the rotation reads as cancelled before it started), and the leak is told as
  // one nothing rotates: a leak run started for it would fail at its first step, its emails saying
  // rotating, then failed.
  const unrotated = t.deleted || t.unmanaged;
  const notHeard = async (incidentId: string, incidentRotationId: string, joined?: () => Promise<LeakResult>): Promise<LeakResult> => {
    // Closed only while still unheard: a parallel report that signalled the run first (recording it
    // on the incident's rotation) had it heard, and this report joins that (its run revoked the value).
    const closed = await withTransaction(deps.pool, (tx) =>
      closeUnanswered(tx, incidentId, incidentRotationId, 'the rotation it was for ended before the leak reached it; the credential is not rotated, so its leak was told without a rotation'),
    );
    if (!closed && joined) return joined();
    return reportUnrotated(deps, t, body, who);
  };
  // The incident commits with its rotation's rows or not at all: an incident left open without a
  // rotation would make every later report only join it. A parallel report of the same credential
  // waits here for this one's commit, then joins.
  const incident = await withTransaction(deps.pool, async (tx) => {
    if (replacing) {
      // In one transaction with the opening of its replacement: a parallel report that meets the
      // left-over incident waits here on its row, then finds it closed and this one open, and joins
      // it (before, closed on its own first, it was answered joined to the closed one).
      const closed = await tx.query(`UPDATE leak_incidents SET status = 'closed', closed_at = now() WHERE id = $1 AND status = 'open'`, [replacing.id]);
      const closedLeftOver = closed.rowCount === 1;
      // Its email, if its run never started, is not sent late: this report's incident has its own.
      if (closedLeftOver) await abandonMail(tx, incidentMailId(replacing.id), 'its incident was closed without a rotation; a later report opened another');
      // Closed meanwhile by another: a parallel report replacing it (whose incident is open now, and
      // is joined below), or its own run as it ended, which answered the leak this report names (the
      // same version: a duplicate; another version is answered afresh).
      if (!closedLeftOver && !replacing.newVersion) {
        const open = await tx.query(`SELECT 1 FROM leak_incidents WHERE credential_id = $1 AND status = 'open'`, [t.credentialId]);
        if (open.rowCount === 0) return 'answered' as const;
      }
    }
    const opened = (
      await tx.query(
        `INSERT INTO leak_incidents (id, credential_id, identity_id, version, source, rotation_id, left_over) VALUES ($1, $2, $3, $4, $5, $7, $8)
         ON CONFLICT (credential_id) WHERE status = 'open' DO UPDATE SET reports = leak_incidents.reports
         RETURNING id, version, rotation_id, left_over, (xmax = 0) AS created, opened_at < now() - make_interval(secs => $6) AS stale,
                   (SELECT r.run_id FROM rotation_runs r
                     WHERE r.rotation_id = leak_incidents.rotation_id AND r.credential_id = leak_incidents.credential_id) AS run_id`,
        [newIncidentId, t.credentialId, t.identityId, t.version, body.source, STALE_INCIDENT_SECONDS, rotationId, leftOver ?? null],
      )
    ).rows[0] as { id: string; version: number; rotation_id: string | null; left_over: number | null; created: boolean; stale: boolean; run_id: string | null };
    if (!opened.created) return opened;
    // Revoked since this report found it live: its rotation ended meanwhile, revoking the value, then
    // closing the incident this report would have joined. Opened now, it was a second incident,
    // email and rotation (of the value that replaced it). Asked after the INSERT, which waited for
    // any parallel one: a run's revoke commits before its close. (Not when the incident carries a
    // version a left-over one handed it: that one is still to be revoked.)
    if (leftOver === undefined) {
      const { rows } = await tx.query('SELECT revoked_at IS NULL AS live FROM secret_versions WHERE credential_id = $1 AND version = $2', [t.credentialId, t.version]);
      if (!rows[0]) throw new DestroyedMeanwhile();
      if (!rows[0].live) throw new RevokedMeanwhile();
    }
    // The incident names this rotation before its row is in: the foreign key is checked at commit.
    await tx.query(`INSERT INTO rotations (id, identity_id, kind, reason, workflow_id) VALUES ($1, $2, 'leak', $3, $4)`, [
      rotationId,
      t.identityId,
      `leak reported by ${body.source}`,
      workflowId,
    ]);
    await tx.query(`INSERT INTO rotation_runs (rotation_id, credential_id, workflow_id) VALUES ($1, $2, $3)`, [rotationId, t.credentialId, workflowId]);
    // No one to tell (no security contacts, owners or identity email): no email, rather than one
    // tried for a day against "no recipients" and then recorded as undelivered.
    if (to.length === 0) return opened;
    await queueMail(tx, {
      id: mailId,
      identityId: t.identityId,
      purpose: 'leak.incident',
      to,
      subject: `[mailgent] SECURITY: leak reported for ${t.name}`,
      text: [
        `A leak of the ${meta.kind} credential '${t.name}' (version ${t.version}) was reported by ${body.source}.`,
        ...(body.details ? ['', `Details: ${body.details}`] : []),
        '',
        'Mailgent is rotating it now, without a grace period: the leaked value is revoked as soon as the new one is in place.',
        'You will get a notice when the rotation has finished.',
        '',
        `Incident: ${opened.id}`,
        `Credential id: ${t.credentialId}`,
        `Workflow: ${workflowId}`,
      ].join('\n'),
    });
    await appendAudit(tx, { ...who, identityId: t.identityId, action: 'mail.send', credentialId: t.credentialId, outcome: 'ok', detail: { messageId: mailId, purpose: 'leak.incident', incidentId: opened.id } });
    return opened;
  }).catch((err: unknown) => {
    if (err instanceof RevokedMeanwhile) return 'revoked' as const;
    if (err instanceof DestroyedMeanwhile) return 'destroyed' as const;
    throw err;
  });
  if (incident === 'revoked') return { credentialId: t.credentialId, version: t.version, action: 'already-revoked' as const };
  if (incident === 'destroyed') return reportUnrotated(deps, { ...t, deleted: true }, body, who);
  if (incident === 'answered') return replacing!.answered();
  // The version a left-over incident this one replaced handed it (kept on it): a report that starts
  // or signals its run passes it on, as its opener did.
  if (leftOver === undefined && incident.left_over !== null) leftOver = incident.left_over;
  if (!incident.created) {
    // A report counts on the incident it joins once it is answered so: not one answered 503 (asked to
    // report again), nor one that closes a left-over incident and opens its own.
    const joined = async (): Promise<LeakResult> => {
      // Replaced meanwhile by a parallel report (closed in the transaction that opened its successor,
      // whose run this report may have found running): it joins the successor instead. One closed
      // by its own run as it ended, with none open since, answered this report's leak: it counts there.
      const counted = await deps.pool.query(
        // (A repeat counts only where nothing counts its report: the first answered 503 took its count back.)
        `UPDATE leak_incidents SET reports = reports + CASE WHEN $3 AND reports > 0 THEN 0 ELSE 1 END
          WHERE id = $1 AND (status = 'open' OR NOT EXISTS (SELECT 1 FROM leak_incidents o WHERE o.credential_id = $2 AND o.status = 'open'))`,
        [incident.id, t.credentialId, body.repeat === true],
      );
      if (counted.rowCount === 0 && !again) return respond(deps, t, body, who, true, leftOver);
      return { credentialId: t.credentialId, version: t.version, incidentId: incident.id, workflowId, ...(incident.rotation_id ? { rotationId: incident.rotation_id } : {}), action: 'joined' as const };
    };
    // A fingerprint, or a name with a version, names the version that leaked. Another version than
    // the open incident's (the value that incident's rotation just made, say) is a new leak, not a
    // duplicate: the run must hear of it, or it closes the incident with that value still live. (A
    // report by name alone names the current version, whichever leaked: those join as duplicates,
    // once the run is seen running.)
    const newVersion = (Boolean(body.fingerprint) || body.version !== undefined) && incident.version !== t.version;
    const handle = deps.client.workflow.getHandle(workflowId);
    let running: boolean;
    // The incident's rotation whose start went through with its answer lost (or its starter gone):
    // its run is recorded once a report finds a run going, or the rotation would read as running for ever.
    const unrecorded = incident.run_id === null ? incident.rotation_id : null;
    try {
      if (newVersion) {
        await handle.signal(leakSignal, { incidentId: versionLeakId(incident.id, t.version), version: t.version });
        running = true;
        if (unrecorded) await startLeakRun(deps, t, unrecorded, incident.id, incident.version, undefined, unrotated);
      } else {
        const latest = await handle.describe();
        running = latest.status.name === 'RUNNING';
        // A run other than the incident's (its own ended, and a requested rotation runs now) has not
        // heard of the leak: without the signal it would go through its grace period with the
        // leaked value working, and close the incident at its end. (Not the incident's own run, nor
        // the run it continued as: a run continued as new would take the incident for a new one.)
        const own = async () => incident.run_id !== null && (await latestRunOf(deps.client, workflowId, incident.run_id)).runId === latest.runId;
        // (An unrecorded incident's recording signals the run going, this one's or another: a run hears an incident once.)
        if (running && unrecorded) running = await startLeakRun(deps, t, unrecorded, incident.id, incident.version, undefined, unrotated);
        else if (running && latest.runId !== incident.run_id && !(await own())) {
          // The incident's own version, the one that leaked: before, the version this report resolved
          // went in its place (by name, the current one), so an older leaked version (a value stored
          // by hand since) was never revoked, and the run closed the incident as heard. The report's
          // own version goes too where it is another (by name: the current value, rotated again).
          await handle.signal(leakSignal, { incidentId: incident.id, version: incident.version });
          if (t.version !== incident.version) await handle.signal(leakSignal, { incidentId: versionLeakId(incident.id, t.version), version: t.version });
        }
      }
    } catch (err) {
      if (!(err instanceof WorkflowNotFoundError)) {
        throw new UnavailableError('the leak could not be passed to the running rotation (Temporal is unavailable); report again shortly');
      }
      running = false;
    }
    if (running) {
      if (leftOver !== undefined) await signalLeak(handle, { incidentId: versionLeakId(incident.id, leftOver), version: leftOver });
      await deliverIncidentMail(deps, incidentMailId(incident.id));
      return joined();
    }
    // No run is there to hear it. If the incident's run has not been started yet and the incident
    // was just opened, its run is still being started: the report is a duplicate after all, or
    // (another version) it is tried again in a moment. Once its run was started (or the incident is
    // older), the run ended and left its incident open (terminated, or failed), and nothing would
    // ever close it: the incident goes with its run, and the report is answered afresh, a new
    // incident and a leak rotation (once).
    if (!incident.stale && !incident.run_id) {
      if (incident.rotation_id) {
        // Its starter may also have died (or lost Temporal) between the incident's commit and the
        // start: nothing else would start the run, and this report would join an incident nobody
        // answers. So the report starts it as the starter would have (one run per workflow id: a
        // run the starter got going meanwhile is signalled instead, and hears the incident once),
        // and hands the incident email over.
        if (!(await startLeakRun(deps, t, incident.rotation_id, incident.id, incident.version, leftOver, unrotated))) return notHeard(incident.id, incident.rotation_id, joined);
        await deliverIncidentMail(deps, incidentMailId(incident.id));
        if (newVersion) await signalLeak(handle, { incidentId: versionLeakId(incident.id, t.version), version: t.version });
        return joined();
      }
      if (!newVersion) return joined();
      throw new UnavailableError('the leak rotation is still starting; report again shortly');
    }
    // The left-over incident's own version, or the one it was handed, when another than this
    // report's and still live (its run ended before revoking it: terminated after its promotion,
    // say), goes to the incident that replaces it: else both incidents end closed with that leaked
    // value still working. (One: the incident's own first.)
    const handed = [incident.version, leftOver].filter((v): v is number => v !== undefined && v !== t.version);
    const live = await liveVersions(deps.pool, t.credentialId, handed);
    const passOn = handed.find((v) => live.includes(v));
    if (!again) return respond(deps, t, body, who, true, passOn, { id: incident.id, newVersion, answered: joined });
    throw new UnavailableError('the leak rotation could not be started; report again shortly');
  }

  // A start that fails leaves the incident open, its rotation unstarted: the start may have reached
  // Temporal with only its answer lost (closing the incident then would leave the run's incident
  // email unsent), and a report again within STALE_INCIDENT_SECONDS starts it (above), a later one
  // replaces the incident. Once the rotation runs, whatever fails leaves the incident open too (a
  // report again joins it, and starts the incident email's delivery if it has not started).
  // The incident counted this report as it opened: answered 503 (report again), it is not counted,
  // or the report repeated as asked would count twice.
  const uncount = (err: unknown) =>
    deps.pool
      .query('UPDATE leak_incidents SET reports = reports - 1 WHERE id = $1 AND reports > 0', [incident.id])
      .catch(() => undefined)
      .then(() => Promise.reject(err));
  const rotating = { credentialId: t.credentialId, version: t.version, incidentId: incident.id, workflowId, rotationId, action: 'rotating' as const };
  if (!(await startLeakRun(deps, t, rotationId, incident.id, t.version, leftOver, unrotated).catch(uncount))) {
    // (Heard all the same, by a parallel report's signal: answered as this report's rotation.)
    return notHeard(incident.id, rotationId, async () => (await deliverIncidentMail(deps, mailId), rotating));
  }
  await deliverIncidentMail(deps, mailId).catch((err: unknown) => uncount(Object.assign(err as Error, { leakStarted: rotating })));
  return rotating;
}

/** Whether a run of the credential's rotation is going (503 when Temporal cannot say). */
async function rotationRunning(deps: LeakDeps, workflowId: string): Promise<boolean> {
  try {
    return (await statusOf(deps.client.workflow.getHandle(workflowId))) === 'RUNNING';
  } catch {
    throw new UnavailableError('the leak could not be checked against a running rotation (Temporal is unavailable); report again shortly');
  }
}

/**
 * A leak of a version that nothing will rotate (deleted, or without a rotation policy), with no
 * rotation of its credential running: answered `deleted` or `no-policy`, and told
 * (queueUnrotatedNotice) to the people who can revoke it by hand, or restore the credential, or give
 * it a policy, and report again to have it rotated. Before, a deleted one's leak was a 404 and no one
 * was told; one without a policy was "rotated" with the generated provider's defaults.
 */
async function reportUnrotated(deps: LeakDeps, t: Target, body: { source: string; details?: string }, who: Reporter): Promise<LeakResult> {
  const answer = { credentialId: t.credentialId, version: t.version, action: t.deleted ? ('deleted' as const) : ('no-policy' as const) };
  const mailId = await queueUnrotatedNotice(deps, t, body, who);
  // Handed over on every report while still queued (the first report's hand-over may have failed).
  if (mailId) await deliverIncidentMail(deps, mailId, 'the leak was recorded, but its email could not be handed for delivery (Temporal is unavailable); report again shortly');
  return answer;
}

async function signalLeak(handle: ReturnType<Client['workflow']['getHandle']>, leak: { incidentId: string; version: number }): Promise<void> {
  try {
    await handle.signal(leakSignal, leak);
  } catch {
    throw new UnavailableError('the leak could not be passed to the running rotation (Temporal is unavailable); report again shortly');
  }
}

/**
 * Starts the delivery of an incident's email if it is still queued (the report that opened the
 * incident may have started its rotation and then lost Temporal before the delivery).
 */
async function deliverIncidentMail(
  deps: LeakDeps,
  mailId: string,
  unavailable = 'the leak rotation is running, but its incident email could not be handed for delivery (Temporal is unavailable); report again shortly',
): Promise<void> {
  try {
    await startDelivery(deps.pool, deps, mailId);
  } catch (err) {
    if (err instanceof AppError) throw err;
    throw new UnavailableError(unavailable);
  }
}

const TARGET_SQL = `
  SELECT c.id AS credential_id, c.identity_id, c.name, c.kind, v.version,
         v.revoked_at IS NULL AS live, c.deleted_at IS NOT NULL AS deleted, c.rotation IS NULL AS unmanaged
    FROM credentials c JOIN secret_versions v ON v.credential_id = c.id`;

/**
 * The credential's `version` (its current one if absent), as a fingerprint report of that version's
 * value would find it; a soft-deleted one too (its name stays taken until it is destroyed): its leak
 * is told, not rotated.
 */
async function byCredential(deps: LeakDeps, ref: string, version: number | undefined, scope: string | undefined): Promise<Target[]> {
  let { rows } = await deps.pool.query(
    `${TARGET_SQL}
      WHERE v.version = coalesce($4::int, c.current_version) AND (c.name = $1 OR c.id = $3::uuid) AND ($2::uuid IS NULL OR c.identity_id = $2)`,
    [ref, scope ?? null, idOf(ref) ?? null, version ?? null],
  );
  // (The admin's report by name: an identity's live credential goes before another identity's deleted one.)
  if (rows.some((r) => !r.deleted)) rows = rows.filter((r) => !r.deleted);
  // The name is not repeated: a leaked value given in its place (`mailgent leak <value>`) would be.
  if (rows.length === 0) {
    const which = version === undefined ? '' : ` with a version ${version}`;
    throw new NotFoundError(`no credential of yours has that name or id${which} (to report a value, give its SHA-256 fingerprint)`);
  }
  if (rows.length > 1) throw new UnprocessableError(`'${ref}' names credentials of several identities; report it by id`);
  return rows.map(toTarget);
}

async function byFingerprint(deps: LeakDeps, sha256Hex: string, scope: string | undefined): Promise<Target[]> {
  const fingerprint = await deps.secrets.fingerprintOfSha256(deps.pool, Buffer.from(sha256Hex, 'hex'));
  const { rows } = await deps.pool.query(
    `${TARGET_SQL} WHERE v.fingerprint = $1 AND ($2::uuid IS NULL OR c.identity_id = $2)`,
    [fingerprint, scope ?? null],
  );
  if (rows.length === 0) throw new NotFoundError('no stored version matches this fingerprint');
  return rows.map(toTarget);
}

/** What a keyed report acts on, kept with its key: a repeat acts on the same versions. */
interface Pinned {
  credentialId: string;
  version: number;
}

/** The versions a keyed report pinned, as they are now (one revoked since reads as such). */
async function pinnedTargets(deps: LeakDeps, pinned: Pinned[], scope: string | undefined): Promise<Target[]> {
  const { rows } = await deps.pool.query(
    `${TARGET_SQL} JOIN unnest($1::uuid[], $2::int[]) AS p(credential_id, version) ON p.credential_id = c.id AND p.version = v.version
      WHERE ($3::uuid IS NULL OR c.identity_id = $3)`,
    [pinned.map((p) => p.credentialId), pinned.map((p) => p.version), scope ?? null],
  );
  if (rows.length === 0) throw new NotFoundError('the credentials this report named (by its Idempotency-Key) are destroyed');
  return rows.map(toTarget);
}

function toTarget(r: Record<string, any>): Target {
  return { credentialId: r.credential_id, identityId: r.identity_id, name: r.name, version: r.version, live: r.live, deleted: r.deleted, unmanaged: r.unmanaged, kind: r.kind };
}
