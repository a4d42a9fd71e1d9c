import { randomUUID } from 'node:crypto';
import { Router } from 'express';
import type { z } from 'zod';
import { WorkflowExecutionAlreadyStartedError, WorkflowNotFoundError, WorkflowUpdateFailedError, type Client, type WorkflowHandle } from '@temporalio/client';
import { ConflictError, NotFoundError, refWithheld, storedValueGiven, UnavailableError, UnprocessableError } from '../../core/errors';
import type { Logger } from '../../core/logger';
import { withTransaction, type Pool } from '../../db/pool';
import { recordBatchRun, RUN_ERROR_SQL, RUN_OUTCOME_SQL } from '../../db/run-outcome';
import { findStoredValueIn, MIN_SCANNED_LENGTH } from '../../mail/secret-scan';
import { appendAudit, auditChangeMade, auditFailure, callerEntry } from '../../vault/audit';
import type { Caller, Kind, Vault } from '../../vault/vault';
import type { rotateBatch } from '../../workflows/batch';
import { progressQuery, rollbackUpdate } from '../../workflows/definitions';
import type { RotationProgress } from '../../workflows/types';
import { endpoint, type AuthDeps } from '../endpoint';
import { rotationCancelling, rotationReport, rotationRolledBack, rotationStarted } from '../responses';
import { rotationsStart } from '../schemas';
import { claimKey, idempotencyKeyOf, keyed, KeyTaken, repeatOf } from '../idempotency';
import { isUuid } from '../../core/ids';
import { batchRunOf, latestRunOf, statusOf } from '../../core/run-chain';

export interface RotationDeps {
  pool: Pool;
  vault: Vault;
  client: Client;
  taskQueue: string;
  /** For a change made whose audit row could not be written (auditChangeMade). */
  logger?: Pick<Logger, 'error'>;
}

/**
 * Rotations: a request makes one batch workflow (rotation:<rotationId>) that starts one
 * rotateCredential per credential (rotate:<credentialId>) and mails `notify` a summary.
 */
export function rotationRoutes(auth: AuthDeps, deps: RotationDeps): Router {
  const router = Router();

  router.post(
    '/v1/rotations',
    ...endpoint(auth, {
        who: 'identity',
        action: 'rotation.start',
        summary: 'Rotate credentials (by name/id or a filter) in one batch',
        body: rotationsStart,
        responses: { 202: rotationStarted },
        problems: [404, 422],
      }, async ({ req, body, caller }) => ({
      status: 202,
      body: await startRotation(deps, caller, { ...body, idempotencyKey: idempotencyKeyOf(req.get('idempotency-key'), body.idempotencyKey) }),
    })),
  );

  router.get(
    '/v1/rotations/:id',
    // The action names the row a refused look-up (404) writes; a successful read is not audited.
    ...endpoint(auth, { who: 'identity', action: 'rotation.describe', summary: 'A rotation’s state and each credential’s progress', responses: { 200: rotationReport }, problems: [404] }, async ({ req, caller }) => ({ body: await rotationStatus(deps, caller, String(req.params.id)) })),
  );

  // Cancel: runs before promotion are undone; runs in their grace period are rolled back.
  router.delete(
    '/v1/rotations/:id',
    ...endpoint(auth, { who: 'identity', action: 'rotation.cancel', summary: 'Cancel a rotation (undone before promotion, rolled back in grace)', responses: { 202: rotationCancelling }, problems: [404] }, async ({ req, caller }) => {
      const rotation = await ownRotation(deps.pool, caller.identityId, String(req.params.id));
      // First the batch, so no waiting run starts from now on (a run starting meanwhile is cancelled by the batch itself).
      // A sweep is not one owner's to cancel: its runs of the caller's credentials are, each marked
      // so (rotation_runs.cancelled_at) before it starts: its waves never mark it, a start already
      // marked and sent is cancelled by the wave that records it (recordBatchRun), and a later
      // selection in the same sweep finds the row there. The next sweep selects it again if it is still due.
      if (rotation.scoped_to) {
        await deps.pool.query(
          `UPDATE rotation_runs r SET cancelled_at = coalesce(r.cancelled_at, now()) FROM credentials c
            WHERE r.rotation_id = $1 AND c.id = r.credential_id AND c.identity_id = $2 AND r.run_id IS NULL`,
          [rotation.id, rotation.scoped_to],
        );
      } else await deps.pool.query('UPDATE rotations SET cancelled_at = coalesce(cancelled_at, now()) WHERE id = $1', [rotation.id]);
      let all = await runsOf(deps.pool, rotation);
      // A start a wave sent without recording its run (its worker died between the two) may have
      // started one. Started by this batch (its memo says so: not a leak's or another batch's
      // rotation of the same credential), running or ended, it is taken as this batch's, by its
      // first run's id (under which it records its outcome, whatever runs it continued as), as the
      // batch's wait takes it at its deadline: running, it is cancelled with the others below;
      // ended, it is reported as it ended (it may have rotated the credential), in neither list.
      // Left unrecorded, either read as "cancelled before it started" (no run id in a cancelled
      // batch), and the batch's wait, which starts nothing more once it is cancelled, never looks.
      const sent = all.filter((r) => !r.run_id && r.start_sent);
      for (const run of sent) {
        const runId = await temporal(() => batchRunOf(deps.client, run.workflow_id, rotation.id));
        if (runId === undefined) continue;
        await recordBatchRun(deps.pool, rotation.id, run.credential_id, runId);
      }
      // Read again: the runs taken over, with their outcomes (and any a wave recorded meanwhile).
      if (sent.length > 0) all = await runsOf(deps.pool, rotation);
      const notStarted = all.filter((r) => !r.run_id).map((r) => r.credential_id);
      const runs = all.filter((r) => r.run_id && !['failed', 'cancelled', 'rolled_back'].includes(r.outcome ?? ''));
      const cancelled: string[] = [];
      const finishing: string[] = [];
      const going: { credentialId: string; handle: WorkflowHandle; promoted: boolean }[] = [];
      for (const run of runs) {
        const { handle, status } = await temporal(() => latestRunOf(deps.client, run.workflow_id, run.run_id!));
        if (status === 'RUNNING') going.push({ credentialId: run.credential_id, handle, promoted: run.outcome === 'rotated' });
      }
      // Promoted and past its grace period (or with none): nothing of it is undone any more, it
      // finishes (revoke, notices). Before, it was listed as cancelling, and ended rotated. Its
      // worker is asked, all of them at once under one deadline (a batch of 1,000 may all be in
      // grace: one by one, a worker away would have made it 1,000 waits of 5 s).
      const past = await pastGrace(deps.client, going.filter((g) => g.promoted).map((g) => g.handle));
      for (const g of going) {
        if (past.has(g.handle)) {
          finishing.push(g.credentialId);
          continue;
        }
        await temporal(() => g.handle.cancel());
        cancelled.push(g.credentialId);
      }
      await auditChangeMade(
        deps,
        {
          ...caller,
          action: 'rotation.cancel',
          outcome: 'ok',
          detail: {
            rotationId: rotation.id,
            cancelled: cancelled.length,
            notStarted: notStarted.length,
            ...(finishing.length ? { finishing: finishing.length } : {}),
            ...(rotation.scoped_to ? { ownCredentialsOnly: true } : {}),
          },
        },
        `the cancellation of rotation ${rotation.id}`,
      );
      return { status: 202, body: { rotationId: rotation.id, cancelling: cancelled, notStarted, finishing } };
    }),
  );

  // Rollback (during the grace period): the previous version becomes current again everywhere.
  router.post(
    '/v1/rotations/:id/rollback',
    ...endpoint(auth, { who: 'identity', action: 'rotation.rollback', summary: 'Make the previous version current again (grace period only)', responses: { 200: rotationRolledBack }, problems: [404, 409] }, async ({ req, caller }) => ({
      body: await rollbackRotation(deps, caller, String(req.params.id)),
    })),
  );

  return router;
}

/** Starts one batch rotation of the caller's credentials (POST /v1/rotations, MCP rotate_credentials). */
export async function startRotation(deps: RotationDeps, caller: Caller, input: z.output<typeof rotationsStart>) {
  const { idempotencyKey, ...body } = input;
  const key = keyed('rotation.start', idempotencyKey, body);
  const repeat = (rotationId: string) => repeatedRotation(deps, caller, rotationId);
  const earlier = await repeatOf(deps.pool, caller, key, repeat);
  if (earlier) return earlier;
  const credentialIds = await selectCredentials(deps, caller.identityId, body);
  // The reason goes into every notice of the batch, and a credential's notice is scanned only for
  // that credential's values (mail/notify.ts): it is checked here against every value the caller
  // may read (its own, and those granted to it), as mail.send is.
  if ((body.reason?.length ?? 0) >= MIN_SCANNED_LENGTH && (await findStoredValueIn({ subject: '', text: body.reason! }, deps.vault.readableValues(caller.identityId)))) {
    throw new UnprocessableError('reason must not contain a stored value: it is sent in the rotation notices');
  }
  const rotationId = randomUUID();
  const batchWorkflowId = `rotation:${rotationId}`;
  const made = await withTransaction(deps.pool, async (tx) => {
    await tx.query(`INSERT INTO rotations (id, identity_id, kind, reason, notify, workflow_id) VALUES ($1, $2, 'request', $3, $4, $5)`, [
      rotationId,
      caller.identityId,
      body.reason ?? null,
      body.notify ?? [],
      batchWorkflowId,
    ]);
    await tx.query(
      `INSERT INTO rotation_runs (rotation_id, credential_id, workflow_id) SELECT $1, c, 'rotate:' || c FROM unnest($2::uuid[]) AS c`,
      [rotationId, credentialIds],
    );
    // A request with the same key committed since the look above: this one is rolled back, and answered with that one's rotation.
    if (key && !(await claimKey(tx, caller, key, rotationId))) throw new KeyTaken();
    await appendAudit(tx, { ...caller, action: 'rotation.start', outcome: 'ok', detail: { rotationId, credentials: credentialIds.length } });
  }).catch((err: unknown) => {
    if (err instanceof KeyTaken) return false;
    throw err;
  });
  if (made === false) {
    const winner = await repeatOf(deps.pool, caller, key, repeat);
    if (winner) return winner;
    throw new UnavailableError('another request with this Idempotency-Key was being carried out; try again');
  }
  const started = () => ({ rotationId, batchWorkflowId, workflowIds: credentialIds.map((id) => `rotate:${id}`).sort() });
  try {
    await startBatch(deps, rotationId);
  } catch (err) {
    // Not started, or not known to be: the batch is marked cancelled, so its runs read as never
    // started rather than running for ever, and a start that reached the server after all starts none.
    // Its key, if it had one, is given back with it: a repeat (the answer said try again) makes a new
    // rotation. Unless a repeat has taken the start over meanwhile (see repeatedRotation): it is left
    // to that repeat, and this answer says so. Nor once the batch's first wave has begun: the start
    // reached the server after all (its answer lost) and rotations are going; the answer is the
    // rotation's. (Cancelled, its key given back, the wave's runs would have gone on all the same, and
    // the request repeated as a 503 asks would have rotated those credentials a second time.)
    //
    // Decided under the rotation's row lock, each read a statement of its own after it (seeing what
    // committed before the lock was had): a repeat's take-over, and the wave's mark, which takes the
    // row FOR SHARE (activities/batch.ts): a wave marked its start before this looks, or finds the
    // rotation cancelled.
    const outcome = await withTransaction(deps.pool, async (tx) => {
      const { rows: locked } = await tx.query('SELECT start_taken_over_at IS NOT NULL AS taken_over FROM rotations WHERE id = $1 FOR UPDATE', [rotationId]);
      if (locked[0].taken_over) return 'taken-over' as const;
      const { rowCount: begun } = await tx.query('SELECT 1 FROM rotation_runs WHERE rotation_id = $1 AND (run_id IS NOT NULL OR start_sent_at IS NOT NULL) LIMIT 1', [rotationId]);
      if (begun) return 'begun' as const;
      await tx.query('UPDATE rotations SET cancelled_at = coalesce(cancelled_at, now()) WHERE id = $1', [rotationId]);
      await tx.query(`DELETE FROM idempotency_keys WHERE target_id = $1 AND action = 'rotation.start'`, [rotationId]);
      return 'cancelled' as const;
    });
    if (outcome === 'begun') return started();
    if (outcome === 'taken-over') {
      const carried = new UnavailableError(
        `the rotation's start could not be confirmed (${err instanceof Error ? err.message : 'Temporal failed'}); a repeat of this request with the same Idempotency-Key has taken it over and answers with rotation ${rotationId}`,
      );
      throw await auditFailure(deps.pool, callerEntry(caller, 'rotation.start', { rotationId, startTakenOver: true }), carried);
    }
    // The row above says the rotation was recorded; this one, naming it, that it never started.
    throw await auditFailure(deps.pool, callerEntry(caller, 'rotation.start', { rotationId, notStarted: true }), err);
  }
  return started();
}

/**
 * Starts a rotation's batch workflow (rotation:<id>), once: a start that finds it there (running or
 * ended) is no failure. REJECT_DUPLICATE, so that a batch that ended is not run a second time.
 */
async function startBatch(deps: RotationDeps, rotationId: string): Promise<void> {
  try {
    await temporal(() =>
      deps.client.workflow.start<typeof rotateBatch>('rotateBatch', {
        taskQueue: deps.taskQueue,
        workflowId: `rotation:${rotationId}`,
        args: [{ rotationId }],
        workflowIdReusePolicy: 'REJECT_DUPLICATE',
      }),
    );
  } catch (err) {
    if (!(err instanceof WorkflowExecutionAlreadyStartedError)) throw err;
  }
}

/**
 * A repeat of a request by its Idempotency-Key: the rotation the first made, nothing started again
 * (audited as a repeat). Undefined if the first request's start failed (its 503 gave the key back,
 * after this repeat found it): the repeat is then carried out as a new request. The first request
 * may still be starting its batch, or have died before it could: unless the batch's waves have
 * begun (or its owner cancelled it), the repeat takes the start over (marked on the rotation in one
 * statement with the check that it is not cancelled, so the first request's failing start no longer
 * cancels it) and starts the batch: once, since a start that finds it there is answered so. A
 * repeat whose own start fails is a 503; the next repeat starts it.
 */
async function repeatedRotation(deps: RotationDeps, caller: Caller, rotationId: string) {
  const taken = await deps.pool.query(
    `UPDATE rotations SET start_taken_over_at = coalesce(start_taken_over_at, now())
      WHERE id = $1 AND cancelled_at IS NULL
        AND NOT EXISTS (SELECT 1 FROM rotation_runs WHERE rotation_id = $1 AND (run_id IS NOT NULL OR start_sent_at IS NOT NULL))`,
    [rotationId],
  );
  // Asked after the take (a statement of its own, so it sees a cancel that the take waited for): the
  // first request's failed start gave the key back with its cancel.
  const keyed = await deps.pool.query(`SELECT 1 FROM idempotency_keys WHERE target_id = $1 AND action = 'rotation.start'`, [rotationId]);
  if (keyed.rowCount === 0) return undefined;
  if (taken.rowCount) await startBatch(deps, rotationId);
  const runs = await deps.pool.query('SELECT workflow_id FROM rotation_runs WHERE rotation_id = $1 ORDER BY workflow_id', [rotationId]);
  await appendAudit(deps.pool, { ...caller, action: 'rotation.start', outcome: 'ok', detail: { rotationId, repeated: true } });
  return { rotationId, batchWorkflowId: `rotation:${rotationId}`, workflowIds: runs.rows.map((r) => r.workflow_id as string), repeated: true as const };
}

/** How long after a rotation is recorded its batch may still be starting (Temporal's start under way). */
const BATCH_START_SECONDS = 60;

/** A rotation's state and each credential's progress (GET /v1/rotations/:id, MCP rotation_status). */
export async function rotationStatus(deps: RotationDeps, caller: Caller, id: string) {
  const rotation = await ownRotation(deps.pool, caller.identityId, id);
  let runs = await runsOf(deps.pool, rotation);
  // Runs waiting their turn wait on their batch (rotation:<id>). One that ended without starting
  // them (terminated, failed) or was never started (its request's process died once it had recorded
  // the rotation; after BATCH_START_SECONDS) starts none of them: they stay not_started, and the
  // rotation no longer reads as running for ever. (A repeat of that request by its Idempotency-Key
  // starts a batch never started: it reads as running again.) A sweep's runs wait on the sweep's
  // workflow the same way: one failed or terminated leaves them not_started, not running for ever.
  const waiting = runs.filter((r) => !r.run_id && !r.outcome);
  const batchStatus = (rotation.kind === 'request' || rotation.kind === 'sweep') && waiting.length > 0 ? await temporal(() => statusOf(deps.client.workflow.getHandle(rotation.workflow_id))) : 'RUNNING';
  const startedBy = Math.max(rotation.created_at.getTime(), rotation.start_taken_over_at?.getTime() ?? 0) + BATCH_START_SECONDS * 1000;
  const batchEnded = batchStatus !== 'RUNNING' && (batchStatus !== null || Date.now() > startedBy);
  if (batchEnded && waiting.some((r) => r.start_sent)) {
    // A start the batch's last wave sent without recording it (see the cancel above): the run it
    // made, if any, reported as it is (read here, not recorded).
    runs = await Promise.all(
      runs.map(async (r) => {
        if (r.run_id || r.outcome || !r.start_sent) return r;
        const runId = await temporal(() => batchRunOf(deps.client, r.workflow_id, rotation.id));
        if (runId === undefined) return r;
        const { rows } = await deps.pool.query('SELECT outcome, error FROM run_outcomes WHERE run_id = $1', [runId]);
        return { ...r, run_id: runId, outcome: rows[0]?.outcome ?? null, error: rows[0]?.error ?? null };
      }),
    );
  }
  const credentials = await Promise.all(runs.map((run) => describeRun(deps, run)));
  return {
    rotationId: rotation.id as string,
    state: aggregate(credentials.map((c) => c.state), { batchEnded }),
    reason: rotation.reason as string | null,
    createdAt: (rotation.created_at as Date).toISOString(),
    credentials,
  };
}

/** Rolls back every run of a rotation that is in its grace period (POST /v1/rotations/:id/rollback). */
export async function rollbackRotation(deps: RotationDeps, caller: Caller, id: string) {
  const rotation = await ownRotation(deps.pool, caller.identityId, id);
  const results = [];
  /** Temporal out of reach, or a fault: no answer about the grace period (not a 409). */
  const unanswered: unknown[] = [];
  for (const run of await runsOf(deps.pool, rotation)) {
    if (!run.run_id) continue;
    try {
      const { handle } = await temporal(() => latestRunOf(deps.client, run.workflow_id, run.run_id!));
      const done = await temporal(() => handle.executeUpdate(rollbackUpdate));
      results.push({ credentialId: run.credential_id, rolledBack: true, ...done });
    } catch (err) {
      const refusal = rollbackRefusal(err);
      if (refusal === undefined) unanswered.push(err);
      results.push({
        credentialId: run.credential_id,
        rolledBack: false,
        reason: refusal ?? (err instanceof UnavailableError ? err.message : 'not reached: the server failed to handle it; try again'),
      });
    }
  }
  // With nothing rolled back: Temporal out of reach for any run is a 503, try again (which may then
  // go through); else a fault, a 500 (logged with its cause, which is not shown). With some rolled
  // back, those are reported (a retry would not report them).
  if (unanswered.length > 0 && !results.some((r) => r.rolledBack)) throw unanswered.find((e) => e instanceof UnavailableError) ?? unanswered[0];
  if (!results.some((r) => r.rolledBack)) {
    throw new ConflictError(`nothing to roll back: ${results.map((r) => ('reason' in r ? r.reason : '')).join('; ') || 'the rotation has no runs'}`);
  }
  await auditChangeMade(
    deps,
    { ...caller, action: 'rotation.rollback', outcome: 'ok', detail: { rotationId: rotation.id, rolledBack: results.filter((r) => r.rolledBack).length } },
    `the rollback of rotation ${rotation.id}`,
  );
  return { rotationId: rotation.id as string, results };
}

/**
 * The rotation as the caller may see and act on it: a rotation it started, all of it; a sweep's
 * (no identity started it), the runs of the caller's own credentials (`scoped_to` names the caller),
 * which its notices name it by: the owner of a credential the 90-day sweep rotated reads the run,
 * rolls it back in its grace period, or cancels it, and sees nothing of anyone else's. (Before, the
 * id its notice gave was a 404 to everyone.) Neither is a 404, as for an id that does not exist.
 */
async function ownRotation(pool: Pool, identityId: string, id: string) {
  const rotation = isUuid(id)
    ? (
        await pool.query(
          `SELECT ro.*, CASE WHEN ro.identity_id IS NULL THEN $2::uuid END AS scoped_to FROM rotations ro
            WHERE ro.id = $1 AND (ro.identity_id = $2 OR (ro.identity_id IS NULL AND EXISTS (
                    SELECT 1 FROM rotation_runs r JOIN credentials c ON c.id = r.credential_id WHERE r.rotation_id = ro.id AND c.identity_id = $2)))`,
          [id, identityId],
        )
      ).rows[0]
    : undefined;
  if (!rotation) {
    // Text that is no id is not repeated (nor is the path, in the problem's instance or the request log): it may be anything pasted there.
    if (!isUuid(id)) throw refWithheld(new NotFoundError('no rotation with the id given (a rotation id is a UUID)'));
    throw new NotFoundError(`no rotation with id ${id}`);
  }
  return rotation as Record<string, any> & { id: string; scoped_to: string | null };
}

interface RunRow {
  credential_id: string;
  workflow_id: string;
  run_id: string | null;
  /** A wave sent its workflow's start (run_id is then set, unless the wave died before recording it). */
  start_sent: boolean;
  name: string;
  outcome: string | null;
  error: string | null;
}

/** The rotation's runs; of the credentials `scopedTo` owns only, when set (see ownRotation). */
async function runsOf(pool: Pool, rotation: { id: string; scoped_to: string | null }): Promise<RunRow[]> {
  const { rows } = await pool.query(
    `SELECT r.credential_id, r.workflow_id, r.run_id, r.start_sent_at IS NOT NULL AS start_sent, c.name, ${RUN_OUTCOME_SQL} AS outcome, ${RUN_ERROR_SQL} AS error
       FROM rotation_runs r JOIN rotations ro ON ro.id = r.rotation_id JOIN credentials c ON c.id = r.credential_id
       LEFT JOIN run_outcomes o ON o.run_id = r.run_id
      WHERE r.rotation_id = $1 AND ($2::uuid IS NULL OR c.identity_id = $2) ORDER BY c.name`,
    [rotation.id, rotation.scoped_to],
  );
  return rows;
}

/**
 * The credentials a rotation request names, or its filter selects. Only credentials with a rotation
 * policy rotate (as the sweep rotates only those): without one, no provider knows where the value was
 * issued, and a rotation put a random value (the generated provider's defaults) in its place and
 * handed it to the dependents, while the real one went on working where it was issued. Named, one
 * without a policy is a 422 and nothing starts; a filter passes over them.
 */
async function selectCredentials(
  deps: Pick<RotationDeps, 'vault' | 'pool'>,
  identityId: string,
  body: { credentials?: string[]; filter?: { kind?: Kind; olderThanDays?: number } },
): Promise<string[]> {
  if (body.credentials) {
    const { found, missing } = await deps.vault.resolve(identityId, [...new Set(body.credentials)]);
    if (missing.length) {
      // Named as given, but any that is a value the caller can read (vault/withheld.ts): this answer reaches the caller's logs.
      const stored = await deps.vault.storedRefs(identityId, missing);
      const named = missing.filter((ref) => !stored.has(ref));
      if (named.length === missing.length) throw new NotFoundError(`no credential named or with id: ${named.join(', ')}`);
      const withheld = `${missing.length - named.length} ${named.length ? 'more ' : ''}not repeated (${storedValueGiven()})`;
      throw refWithheld(new NotFoundError(`no credential named or with id: ${[...named, withheld].join(', ')}`));
    }
    const ids = [...new Set(found.values())];
    const { rows: unmanaged } = await deps.pool.query<{ name: string; kind: string }>(
      'SELECT name, kind FROM credentials WHERE id = ANY($1::uuid[]) AND rotation IS NULL ORDER BY name',
      [ids],
    );
    if (unmanaged.length) {
      const seeds = unmanaged.some((c) => c.kind === 'totp_seed') ? ' (a totp_seed takes none: enrol a new seed with its service and store it with vault.store)' : '';
      throw new UnprocessableError(
        `no rotation policy: ${unmanaged.map((c) => c.name).join(', ')}; a credential is rotated by its policy's provider, so give it one first (PATCH /v1/credentials/:ref with rotation)${seeds}`,
      );
    }
    return ids;
  }
  const ids: string[] = [];
  let matched = 0;
  for (let after: string | undefined; ; ) {
    const page = await deps.vault.list(identityId, { ...body.filter, after, limit: 1000 });
    matched += page.length;
    ids.push(...page.filter((c) => c.policy).map((c) => c.id));
    if (page.length < 1000) break;
    after = page.at(-1)!.name;
  }
  if (matched === 0) throw new UnprocessableError('no credential matches the filter; nothing to rotate');
  if (ids.length === 0) throw new UnprocessableError(`none of the ${matched} credentials the filter matches has a rotation policy; nothing to rotate`);
  return ids;
}

/**
 * Which of these promoted runs are past their grace period, or had none: running again after it
 * (not in grace, nor rolling back, which it does in state 'grace'), their own promote done and
 * their grace step done or skipped. A cancel no longer undoes anything of them. One whose worker
 * does not answer within the one deadline is not (it is cancelled, as before: harmless there, every
 * step after the promotion being out of a cancel's reach).
 */
async function pastGrace(client: Client, handles: WorkflowHandle[]): Promise<Set<WorkflowHandle>> {
  const deadline = Date.now() + 5_000;
  const past = new Set<WorkflowHandle>();
  let next = 0;
  const ask = async () => {
    for (let handle = handles[next++]; handle; handle = handles[next++]) {
      try {
        const progress = await client.connection.withDeadline(deadline, () => handle!.query(progressQuery));
        const step = (name: string) => progress.steps.find((s) => s.name === name)?.state;
        if (progress.state === 'running' && step('promote') === 'done' && ['done', 'skipped'].includes(step('grace') ?? '')) past.add(handle);
        // Its rollback refused (a value stored since is current), it waits out its grace period and
        // ends rotated, whatever a cancel says: before, it was listed as cancelling, and ended rotated.
        else if (progress.state === 'grace' && progress.rollbackRefused !== undefined) past.add(handle);
      } catch {
        // Not answered: cancelled as before.
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(16, handles.length) }, ask));
  return past;
}

async function describeRun({ client, pool }: Pick<RotationDeps, 'client' | 'pool'>, run: RunRow) {
  const base = { credentialId: run.credential_id, name: run.name, workflowId: run.workflow_id, runId: run.run_id, outcome: run.outcome };
  // A batch starts its rotations in waves: a run may wait its turn (or be cancelled before it).
  if (!run.run_id) return { ...base, state: run.outcome ?? 'not_started', status: null, progress: null };
  // The run as it is now: the recorded one may have continued as new (its own state then stays 'running').
  const latest = await temporal(() => latestRunOf(client, run.workflow_id, run.run_id!));
  const { handle } = latest;
  // `outcome` stays the recorded run's (a requested rotation cancelled, its run then continued as
  // a leak rotation, reads cancelled); its state is the latest run's, from its progress or, with no
  // worker answering, its own outcome (recorded under its id): the first run's, recorded before it
  // continued (rotated, say), told a successor that failed as succeeded.
  const latestOutcome =
    latest.runId === run.run_id ? run.outcome : ((await pool.query('SELECT outcome FROM run_outcomes WHERE run_id = $1', [latest.runId])).rows[0]?.outcome ?? null);
  base.runId = latest.runId;
  let progress: RotationProgress | null = null;
  try {
    progress = await client.connection.withDeadline(Date.now() + 5_000, () => handle.query(progressQuery));
  } catch {
    // No worker answered in time: report what the server and the outcome table know.
  }
  // Read again after the query when it was running: a run whose query already tells its outcome is
  // closing, and is reported closed when the server has it so.
  const status = latest.status === 'RUNNING' ? await temporal(() => statusOf(handle)) : latest.status;
  const fallback = status === 'RUNNING' ? 'running' : latestOutcome === 'rotated' ? 'succeeded' : (latestOutcome ?? 'failed');
  // A closed run still answers the query, with the state it had when it closed: one terminated (or
  // timed out) in its grace period said 'grace' for good, its graceEndsAt a revoke that never comes,
  // and held the rotation's state at 'grace' or 'running'. Ended so, it is reported by its outcome,
  // and its steps (the revoke still pending) and status say where it stopped. (Not one continued as
  // new, read between its close and its successor's start: the rotation goes on there.)
  const unfinished = (status === 'TERMINATED' || status === 'TIMED_OUT') && (progress?.state === 'running' || progress?.state === 'grace');
  return { ...base, state: unfinished ? fallback : (progress?.state ?? fallback), status, progress };
}

function aggregate(states: string[], { batchEnded }: { batchEnded: boolean }): string {
  if (states.some((s) => s === 'running' || (s === 'not_started' && !batchEnded))) return 'running';
  // Its batch gone, a run not started never will be.
  if (states.every((s) => s === 'not_started')) return 'not_started';
  const took = states.filter((s) => s === 'succeeded' || s === 'grace').length;
  // A run in its grace period took effect; one that failed beside it makes the batch partial, not grace.
  if (took === states.length) return states.includes('grace') ? 'grace' : 'succeeded';
  if (took > 0) return 'partial';
  if (states.every((s) => s === states[0])) return states[0]!;
  // Stopped on purpose, each where it was: undone before promotion, rolled back in grace.
  return states.every((s) => s === 'cancelled' || s === 'rolled_back') ? 'cancelled' : 'failed';
}

/** Temporal being unreachable is a 503 for the caller, not a 500. */
async function temporal<T>(call: () => Promise<T>): Promise<T> {
  try {
    return await call();
  } catch (err) {
    // The SDK wraps the transport's error ("Failed to start Workflow", its cause UNAVAILABLE …).
    if (/UNAVAILABLE|ECONNREFUSED|deadline|Connection/i.test(`${(err as Error).message} ${innermost(err)}`)) {
      throw new UnavailableError('Temporal is unavailable; try again shortly');
    }
    throw err;
  }
}

/**
 * Why a run was not rolled back, when the answer is about the run: the workflow's own refusal (its
 * grace period is over, a value stored since is current, a leak wins …) or a run that has ended.
 * Anything else (Temporal's own faults, whose words are not for callers) is undefined.
 */
function rollbackRefusal(err: unknown): string | undefined {
  if (err instanceof WorkflowUpdateFailedError) return innermost(err);
  if (err instanceof WorkflowNotFoundError) return 'the rotation has ended';
  return undefined;
}

function innermost(err: unknown): string {
  let e = err as { message?: string; cause?: unknown } | undefined;
  while (e?.cause) e = e.cause as typeof e;
  return e?.message ?? String(err);
}
