import { InternalWorkflowStartOptionsSymbol, type InternalWorkflowStartOptions } from '@temporalio/client/lib/internal';
import { ConflictError, NotFoundError } from '../core/errors';
import { batchRunOf, latestRunOf, runOpenSince, statusOf } from '../core/run-chain';
import { purgeExpiredKeys } from '../db/idempotency-keys';
import { CHANGED_SINCE_SWEEP_SQL, JOINED_EARLIER_SQL, openRunsOf, outcomeBefore, recordBatchRun, RUN_ERROR_SQL, RUN_OUTCOME_SQL } from '../db/run-outcome';
import { eraseSettledMail } from '../mail/outbox';
import { handOverNotice, REFUSED_NOTICE, UNCHECKED_NOTICE } from './notices';
import type { RotationWindow } from '../vault/types';
import type { rotateCredential } from '../workflows/rotate-credential';
import type { RotationMode } from '../workflows/types';
import type { ActivityDeps } from './index';
import { heartbeat, heartbeating, ownRunEnded, sleep, stableUuid } from './support';

/** Rotations one batch keeps open at once unless BATCH_MAX_OPEN_ROTATIONS says otherwise. */
export const DEFAULT_MAX_OPEN_ROTATIONS = 50;

/**
 * How far the Temporal server's clock may lag the database's: a run that closed this long before a
 * start was marked sent (by the database's clock) still counts as one the start may have joined.
 */
const CLOCK_SLACK_MS = 1_000;

const MODES: Record<string, RotationMode> = { request: 'requested', sweep: 'scheduled', policy: 'scheduled', leak: 'leak' };

/**
 * Start options that make a repeated start of a batch's rotation return the run the first one made.
 * Temporal deduplicates starts by request id, finished runs included (as long as no newer run of the
 * workflow id has started). The TypeScript SDK takes a request id only through this internal option
 * (what its Nexus support uses); test/batch.test.ts fails if an upgrade stops honouring it.
 */
function startRequest(rotationId: string, credentialId: string): Pick<InternalWorkflowStartOptions, typeof InternalWorkflowStartOptionsSymbol> {
  return { [InternalWorkflowStartOptionsSymbol]: { requestId: stableUuid(`mailgent/rotation-start\0${rotationId}\0${credentialId}`) } };
}

export interface RunSummary {
  credentialId: string;
  name: string;
  identityId: string;
  recipients: string[];
  outcome: string;
  fromVersion: number | null;
  toVersion: number | null;
  error: string | null;
  nextRotationAt: string | null;
}

/**
 * A credential whose rotation failed stays due, but the sweep tries it again only this long after
 * the failure or its last change (updated_at: a PATCH that fixes its policy waits a day too).
 * Hourly, every sweep would make keys at the provider and send a failure notice again, and rotate
 * on top of what its owners were asked to put back by hand. A day less the sweep's hour: the next
 * day's sweep of the same hour tries it. Held a full 24 hours, a failure a few minutes into a
 * one-hour daily window was still held when the next day's window opened, and closed again before
 * the hold ended: tried every other day.
 */
export const FAILED_RETRY_HOURS = 23;

/**
 * The sweep's page of due credentials (selectDue; the bench explains it): $1 as of, $2/$3 the cursor
 * (at, id) or nulls, $4 the page size, $5 FAILED_RETRY_HOURS. One index scan on (next_rotation_at, id).
 */
export const SELECT_DUE_SQL = `SELECT id, to_char(next_rotation_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS at, rotation->'window' AS window FROM credentials
  WHERE deleted_at IS NULL AND next_rotation_at IS NOT NULL AND next_rotation_at <= $1
    AND ($2::timestamptz IS NULL OR (next_rotation_at, id) > ($2::timestamptz, $3::uuid))
    AND NOT (status = 'rotation_failed' AND updated_at > $1::timestamptz - make_interval(hours => $5))
    AND NOT EXISTS (SELECT 1 FROM run_outcomes o WHERE o.credential_id = credentials.id AND o.outcome <> 'rotated'
                      AND o.finished_at > $1::timestamptz - make_interval(hours => $5))
  ORDER BY next_rotation_at, id
  LIMIT $4`;

/**
 * Batches of rotations (an agent's filter, the scheduled sweep): start one rotateCredential per
 * credential, wait for their outcomes, and send the summaries. Rotations are started by these
 * activities rather than as child workflows so that a credential already rotating is joined, not
 * refused, and the batch's own history stays small.
 */
export function batchActivities(deps: ActivityDeps) {
  const temporal = () => {
    if (!deps.temporal) throw new Error('this worker has no Temporal client for starting rotations');
    return deps.temporal;
  };

  const maxOpen = deps.maxOpenRotations ?? DEFAULT_MAX_OPEN_ROTATIONS;

  /** Takes a sweep's credential out of this sweep, its run not recorded: the next sweep selects it again if it is still due. */
  const dropRow = (rotationId: string, credentialId: string) =>
    deps.pool.query('DELETE FROM rotation_runs WHERE rotation_id = $1 AND credential_id = $2 AND run_id IS NULL', [rotationId, credentialId]);

  /**
   * One wave: as many waiting runs as keep the batch's open runs at or under maxOpen. A run is
   * marked started (run_id) right after its workflow starts; if the batch was cancelled meanwhile,
   * the run is cancelled here, since the cancel request may have listed the runs before this one
   * had its run_id. A wave that dies between the two (a worker killed) is run again by its retry,
   * which finds the run its start made (batchRunOf: by the batch in its memo), running or finished
   * since, even behind a newer run of the credential, or the one it joined (runOpenSince), and
   * records it: the credential is not rotated twice. (A start it sends again, not knowing whether the first reached the server, carries the
   * same request id, which Temporal answers with the first's run while that is the newest.)
   */
  const startWave = async (rotationId: string): Promise<{ started: number }> => {
    const { client, taskQueue } = temporal();
    const now = deps.clock?.() ?? new Date();
    // Most overdue first: a backlog larger than a sweep can start before its deadline leaves the
    // newest-due to the next sweep, not whichever credentials' ids sort last. A start sent but not
    // recorded (the wave died between the two) goes before them all: it may be running (sent again,
    // it answers with that run and is recorded), and a run that promoted has moved its credential
    // to the back, behind as many others as the wave has places.
    // (By the index rotation_runs_waiting, in its order: the run's due_at is its credential's
    // next_rotation_at when the run was added. Before, every wave read, joined and sorted all of
    // the batch's runs: ~200 ms at 100,000 waiting, bench/FINDINGS.md.)
    const { rows } = await deps.pool.query(
      `SELECT r.credential_id, c.identity_id, ro.kind, c.rotation->'window' AS window, r.start_sent_at IS NOT NULL AS start_sent, r.start_sent_at AS sent_at
         FROM rotation_runs r JOIN credentials c ON c.id = r.credential_id JOIN rotations ro ON ro.id = r.rotation_id
        WHERE r.rotation_id = $1 AND r.run_id IS NULL AND r.cancelled_at IS NULL AND ro.cancelled_at IS NULL
        ORDER BY r.start_sent_at IS NULL, r.due_at, r.credential_id
        LIMIT greatest($2 - (SELECT count(*) FROM ${openRunsOf('$1')} r WHERE NOT ${JOINED_EARLIER_SQL}), 0)`,
      [rotationId, maxOpen],
    );
    // A start sent but not recorded made a run only if a run of this batch's is there (every start
    // carries the batch in its memo), and joined one only if another's run was open since the mark.
    // Any other (the wave died between marking it and sending it, or the connection failed before
    // the server had it) is taken for unsent, and checked below as any other row: the credential may have changed, or
    // left rotation, or its window closed, since the mark. (Guessing from the start's error was
    // not enough: the client retries a start that failed, and reports only the last attempt's error.)
    // Found, it is recorded as it is, not started again: a start sent again carries the same request
    // id, which Temporal answers with that run only while it is the workflow's newest; behind a newer
    // run (a leak's, another batch's, begun after it ended) the start would make a run of its own.
    // None of the batch's, the start may have joined another's run (USE_EXISTING), which may have
    // ended since: a run open at any time after the mark is recorded as the one it joined, as the
    // start would have answered. Sent again, the start would rotate the credential a second time.
    // (If the start never reached the server, the batch reports that run's outcome all the same:
    // the rotation of the credential that was going when the batch asked for one, as a start that
    // joined it would have; a failed one is reported failed, and the credential rotated by nothing.)
    let started = 0;
    const taken = new Set<string>();
    for (const row of rows.filter((r) => r.start_sent)) {
      heartbeat();
      const workflowId = `rotate:${row.credential_id}`;
      const runId =
        (await batchRunOf(client, workflowId, rotationId)) ?? (await runOpenSince(client, workflowId, new Date(row.sent_at.getTime() - CLOCK_SLACK_MS)));
      if (runId !== undefined) {
        if (row.kind === 'sweep' && (await outcomeBefore(deps.pool, rotationId, runId))) {
          await dropRow(rotationId, row.credential_id);
          taken.add(row.credential_id);
          continue;
        }
        // Cancelled meanwhile: the run is cancelled here, as a started one is below (it may have continued as new).
        if ((await recordBatchRun(deps.pool, rotationId, row.credential_id, runId)).cancelled) {
          const { handle, status } = await latestRunOf(client, `rotate:${row.credential_id}`, runId);
          if (status === 'RUNNING') await handle.cancel();
        }
        taken.add(row.credential_id);
        started += 1;
        continue;
      }
      await deps.pool.query('UPDATE rotation_runs SET start_sent_at = NULL WHERE rotation_id = $1 AND credential_id = $2 AND run_id IS NULL', [
        rotationId,
        row.credential_id,
      ]);
      row.start_sent = false;
    }
    // Whether a sweep's credential changed since the sweep began, asked of the rows picked only,
    // and by a statement of its own: an agent's batch rotates what it was asked to, and reads no
    // version to pick (a statement that names a table waits for a lock on it even where it would not read it).
    const asked = rows.filter((r) => r.kind === 'sweep' && !r.start_sent).map((r) => r.credential_id as string);
    const changed = new Set<string>();
    if (asked.length > 0) {
      const found = await deps.pool.query(
        `SELECT c.id FROM credentials c JOIN rotations ro ON ro.id = $1
          WHERE c.id = ANY($2::uuid[]) AND ${CHANGED_SINCE_SWEEP_SQL}`,
        [rotationId, asked],
      );
      for (const { id } of found.rows) changed.add(id);
    }
    for (const row of rows) {
      if (taken.has(row.credential_id)) continue;
      heartbeat();
      // A sweep's later waves start up to its deadline after it selected them (as due, or past its
      // password policy's age). A credential changed since (a value stored or promoted: rotated by
      // an agent's batch, a leak, the last sweep's run that was still going), deleted, failed, or
      // given another policy since is dropped: rotating it again would make a second key and a
      // second notice, a failure is tried again a day later, and one taken out of rotation (or no
      // longer due) must not be rotated at all: without a policy it would get a generated value in
      // place of its provider's. The next sweep selects it again if it is still due. A window
      // closed by now defers it to the next sweep inside it (it stays due), instead of rotating it
      // out of hours. Neither applies to a start that reached the server (its wave died before
      // recording the run): sent again, it answers with the run it started.
      if (row.kind === 'sweep' && !row.start_sent && (changed.has(row.credential_id) || (row.window && !windowOpen(row.window, now)))) {
        await dropRow(rotationId, row.credential_id);
        continue;
      }
      if (!row.start_sent) {
        // Not once the batch is cancelled: a cancel that came after the wave read its rows stops the
        // rest of them here (before, each was started and then cancelled, with a notice each).
        // The rotation's row taken FOR SHARE: a request's failed start, cancelling it under its row
        // lock (api/routes/rotations.ts), sees this mark, or this sees its cancel.
        const marked = await deps.pool.query(
          `UPDATE rotation_runs r SET start_sent_at = now()
             FROM (SELECT id FROM rotations WHERE id = $1 AND cancelled_at IS NULL FOR SHARE) ro
            WHERE r.rotation_id = ro.id AND r.credential_id = $2 AND r.cancelled_at IS NULL`,
          [rotationId, row.credential_id],
        );
        if (marked.rowCount === 0) continue;
      }
      const handle = await client.workflow.start<typeof rotateCredential>('rotateCredential', {
        taskQueue,
        workflowId: `rotate:${row.credential_id}`,
        args: [{ rotationId, identityId: row.identity_id, credentialId: row.credential_id, mode: MODES[row.kind] }],
        workflowIdConflictPolicy: 'USE_EXISTING',
        // Which batch started the run: whether a start sent but unrecorded reached the server (above), and whether a cancel that finds it running unrecorded takes it.
        memo: { rotationId },
        ...startRequest(rotationId, row.credential_id),
      });
      // Joined a run that had rotated the credential before the sweep began (in its grace period):
      // not this sweep's; the next sweep selects the credential again if it is still due then.
      if (row.kind === 'sweep' && (await outcomeBefore(deps.pool, rotationId, handle.firstExecutionRunId))) {
        await dropRow(rotationId, row.credential_id);
        continue;
      }
      if ((await recordBatchRun(deps.pool, rotationId, row.credential_id, handle.firstExecutionRunId)).cancelled) {
        await client.workflow.getHandle(handle.workflowId, handle.firstExecutionRunId).cancel();
      }
      started += 1;
    }
    return { started };
  };

  return {
    /**
     * Starts (or joins) rotations for runs of the batch that have none yet, while fewer than
     * maxOpenRotations of its runs are open (started, no outcome); awaitOutcomes starts the rest as
     * runs finish. A cancelled batch starts nothing. Resumable.
     */
    async startRotations(input: { rotationId: string }): Promise<{ started: number }> {
      return startWave(input.rotationId);
    },

    /**
     * Waits until every run of the batch has an outcome (promoted or not), starting waiting runs as
     * open ones finish; heartbeats while it waits. With `until` (a sweep's), it waits no longer:
     * runs not started by then are left to the next sweep (they stay due), and those still running
     * are counted `open` (each sends its own notice when it ends). A run that never ends (stuck on
     * a bug, a non-deterministic deploy) would otherwise hold the sweep, and with it every sweep
     * after it, which the schedule skips while one runs.
     */
    async awaitOutcomes(input: { rotationId: string; pollMs?: number; until?: string }): Promise<{ total: number; rotated: number; failed: number; open?: number }> {
      const { client } = temporal();
      // Each poll reads the runs still going (started, no outcome: at most maxOpen of them, as the
      // waves start them) and whether any waits to start, not every run of the batch: a sweep of a
      // vault whose credentials fell due together holds 100,000 rows. The totals are counted once,
      // at the end.
      const running = async () =>
        (
          await deps.pool.query(
            `SELECT r.workflow_id, r.run_id, ${JOINED_EARLIER_SQL} AS joined FROM ${openRunsOf('$1')} r`,
            [input.rotationId],
          )
        ).rows as { workflow_id: string; run_id: string; joined: boolean }[];
      /**
       * Whether a run waits to start: never once the batch is cancelled (they count as cancelled).
       * Whether, not how many: the first row of the index rotation_runs_waiting, where a count read
       * all of them (a sweep's 100,000) on every poll.
       */
      const waiting = async () =>
        (
          await deps.pool.query(
            `SELECT EXISTS (SELECT 1 FROM rotation_runs r JOIN rotations ro ON ro.id = r.rotation_id
                             WHERE r.rotation_id = $1 AND r.run_id IS NULL AND ro.cancelled_at IS NULL AND r.cancelled_at IS NULL) AS any`,
            [input.rotationId],
          )
        ).rows[0].any as boolean;
      const totals = async () => {
        const { rows } = await deps.pool.query(
          `SELECT count(*)::int AS total, count(*) FILTER (WHERE outcome = 'rotated')::int AS rotated,
                  count(*) FILTER (WHERE outcome <> 'rotated')::int AS failed, count(*) FILTER (WHERE outcome IS NULL)::int AS open
             FROM (SELECT ${RUN_OUTCOME_SQL} AS outcome
                     FROM rotation_runs r JOIN rotations ro ON ro.id = r.rotation_id LEFT JOIN run_outcomes o ON o.run_id = r.run_id
                    WHERE r.rotation_id = $1) runs`,
          [input.rotationId],
        );
        const { total, rotated, failed, open } = rows[0] as { total: number; rotated: number; failed: number; open: number };
        return { total, rotated, failed, ...(open > 0 ? { open } : {}) };
      };
      // A run that ended without recording an outcome (terminated, timed out) counts as failed; one
      // that continued as new is followed to the run it became.
      const settleEnded = async (open: { workflow_id: string; run_id: string }[]) => {
        for (const r of open) {
          heartbeat();
          const latest = await latestRunOf(client, r.workflow_id, r.run_id);
          const status = latest.status ?? 'gone';
          if (status === 'RUNNING') continue;
          // A sweep's run this batch joined before its plan found the credential changed since the
          // sweep began (NotDue), and ended having done nothing: the batch's rotation is started
          // again, as one not yet started (a new run: the start joined that one, and no request id
          // of this batch's is on it). Recorded as failed instead, it would read as a failure and
          // hold the credential out of sweeps for a day (FAILED_RETRY_HOURS).
          if (status === 'COMPLETED' && (await latest.handle.result().catch(() => undefined))?.state === 'not_due') {
            await deps.pool.query('UPDATE rotation_runs SET run_id = NULL, start_sent_at = NULL WHERE rotation_id = $1 AND run_id = $2', [input.rotationId, r.run_id]);
            continue;
          }
          await deps.pool.query(
            `INSERT INTO run_outcomes (run_id, workflow_id, credential_id, outcome, error)
             SELECT run_id, workflow_id, credential_id, 'failed', $2 FROM rotation_runs WHERE run_id = $1 LIMIT 1
             ON CONFLICT (run_id) DO NOTHING`,
            [r.run_id, `the rotation ended as ${status.toLowerCase()} without reporting an outcome`],
          );
        }
      };
      // A start a wave sent without recording its run is taken over if the server has the batch's
      // run (batchRunOf), running or ended. Each row is looked up once.
      const lookedUp = new Set<string>();
      const adoptSent = async () => {
        const sent = await deps.pool.query('SELECT credential_id, workflow_id FROM rotation_runs WHERE rotation_id = $1 AND run_id IS NULL AND start_sent_at IS NOT NULL', [
          input.rotationId,
        ]);
        const adopted: { workflow_id: string; run_id: string }[] = [];
        for (const r of sent.rows) {
          if (lookedUp.has(r.credential_id)) continue;
          lookedUp.add(r.credential_id);
          heartbeat();
          const runId = await batchRunOf(client, r.workflow_id, input.rotationId);
          if (runId === undefined) continue;
          if ((await recordBatchRun(deps.pool, input.rotationId, r.credential_id, runId)).recorded) adopted.push({ workflow_id: r.workflow_id, run_id: runId });
        }
        return adopted;
      };
      for (let round = 0; ; round++) {
        heartbeat();
        const started = await running();
        const anyWaiting = await waiting();
        // Cancelled, the batch starts nothing more, and its rows sent but unrecorded would read as
        // "cancelled before it started": their runs are looked for (the cancel looks too, but may
        // have failed after marking the batch), and one found running is cancelled as the cancel
        // would have, then waited for as the others are.
        if (!anyWaiting) {
          const adopted = await adoptSent();
          for (const run of adopted) {
            heartbeat();
            const { handle, status } = await latestRunOf(client, run.workflow_id, run.run_id);
            if (status === 'RUNNING') await handle.cancel();
          }
          if (adopted.length > 0) continue;
        }
        const outOfTime = (started.length > 0 || anyWaiting) && input.until !== undefined && Date.now() >= Date.parse(input.until);
        if (outOfTime) {
          // What is still open now is counted as running: not a run that has just ended unrecorded.
          await settleEnded(started);
          // Not started by this batch's record: left to the next sweep (they stay due), in one
          // statement, unless the wave sent its start and lost the record of it: such a run,
          // taken over, is settled as the others were (one that ended unrecorded is counted by how
          // it ended, its outcome or failed without one, not as still rotating).
          await settleEnded(await adoptSent());
          await deps.pool.query(
            `DELETE FROM rotation_runs r USING rotations ro
              WHERE r.rotation_id = $1 AND ro.id = r.rotation_id AND ro.cancelled_at IS NULL AND r.run_id IS NULL AND r.cancelled_at IS NULL`,
            [input.rotationId],
          );
        }
        if ((started.length === 0 && !anyWaiting) || outOfTime) return totals();
        // (Runs joined that another batch started before this one are that batch's to count: JOINED_EARLIER_SQL.)
        if (anyWaiting && started.filter((r) => !r.joined).length < maxOpen) {
          // Its batch stopped (terminated by an operator): no more waves. This wait hears of it only
          // at a heartbeat's answer, up to 24 s on; meanwhile it started the waiting runs, which the
          // rotation's status reports as never to start.
          if (await ownRunEnded(client)) return totals();
          await startWave(input.rotationId);
        }
        if (round % 5 === 4) await settleEnded(started);
        await sleep(input.pollMs ?? 1_000);
      }
    },

    /**
     * One summary per recipient: an agent's batch goes to its `notify` list (and the identity's email),
     * a sweep to every team address of the credentials it rotated. Each summary is sent once.
     */
    async sendBatchSummaries(input: { rotationId: string }): Promise<{ sent: number }> {
      return heartbeating(async () => {
        const rotation = (await deps.pool.query('SELECT * FROM rotations WHERE id = $1', [input.rotationId])).rows[0];
        const runs = await summarise(deps, input.rotationId);
        // One summary per recipient and identity: a sweep's address that two identities' credentials
        // list gets one from each (before, one of both: the identities' runs mixed, recorded and
        // audited under one of them, and one's stored value, were it the address, withheld the
        // other's summary too). An agent's batch is its identity's alone.
        const byRecipient = new Map<string, { to: string; identityId: string | null; runs: Set<RunSummary> }>();
        // A run once per recipient, however often the address is listed (the identity's email in
        // `notify` too, an owner also in a credential's notify list): before, it was counted twice.
        // Addresses compared in lower case, as the orphan report compares them: `Team-X@` and
        // `team-x@` are one mailbox (before, two half-summaries), sent to as first spelled.
        const add = (to: string, identityId: string | null, run: RunSummary) => {
          const key = `${identityId ?? ''}\n${to.toLowerCase()}`;
          const entry = byRecipient.get(key);
          if (!entry) byRecipient.set(key, { to, identityId, runs: new Set([run]) });
          else entry.runs.add(run);
        };
        if (rotation.kind === 'request') {
          const identity = rotation.identity_id ? await deps.identities.get(rotation.identity_id) : undefined;
          for (const to of [...rotation.notify, ...(identity?.email ? [identity.email] : [])]) runs.forEach((r) => add(to, rotation.identity_id, r));
        } else {
          for (const run of runs) run.recipients.forEach((to) => add(to, run.identityId, run));
        }
        const identitiesOf = new Map<string, number>();
        for (const { to } of byRecipient.values()) identitiesOf.set(to.toLowerCase(), (identitiesOf.get(to.toLowerCase()) ?? 0) + 1);
        let sent = 0;
        for (const { to, identityId, runs: listed } of byRecipient.values()) {
          heartbeat();
          const list = [...listed];
          const shared = (identitiesOf.get(to.toLowerCase()) ?? 0) > 1;
          await handOverNotice(
            deps,
            {
              id: stableUuid(shared ? `${input.rotationId}:summary:${identityId}:${to}` : `${input.rotationId}:summary:${to}`),
              identityId,
              purpose: 'rotation.summary',
              to: [to],
              ...composeSummary(rotation.kind, rotation.reason, list),
              actor: rotation.kind === 'sweep' ? 'schedule:rotation-sweep' : `workflow:rotation:${input.rotationId}`,
              requestId: input.rotationId,
              // Composed from these runs' metadata (and the reason, checked when the batch was asked
              // for): their credentials' versions are what a slip could put in it. Searching every
              // version of every identity, once per recipient, grew with the whole vault.
              credentialIds: list.map((r) => r.credentialId),
              detail: { rotations: list.length },
            },
            identityId ? [identityId] : [],
          );
          sent += 1;
        }
        return { sent };
      });
    },

    /** Creates (once per sweep workflow) the sweep's rotation record. */
    async beginSweep(input: { workflowId: string; asOf: string }): Promise<{ sweepId: string }> {
      const sweepId = stableUuid(`sweep:${input.workflowId}`);
      await deps.pool.query(
        `INSERT INTO rotations (id, identity_id, kind, reason, workflow_id, created_at) VALUES ($1, NULL, 'sweep', $2, $3, $4)
         ON CONFLICT (id) DO NOTHING`,
        [sweepId, `scheduled sweep as of ${input.asOf}`, input.workflowId, input.asOf],
      );
      return { sweepId };
    },

    /**
     * One page of due credentials, by one index scan on (next_rotation_at, id): adds them to the
     * sweep unless their rotation window is closed right now. Returns the cursor for the next page,
     * its time to the microsecond: a cursor cut to milliseconds (a JS Date) sorts before the row it
     * came from, so that row and every row due in the same millisecond would be selected again.
     */
    async selectDue(input: { sweepId: string; asOf: string; after?: { at: string; id: string }; limit: number }) {
      const { rows } = await deps.pool.query(SELECT_DUE_SQL, [input.asOf, input.after?.at ?? null, input.after?.id ?? null, input.limit, FAILED_RETRY_HOURS]);
      const open = rows.filter((r) => !r.window || windowOpen(r.window, new Date(input.asOf)));
      if (open.length) {
        await deps.pool.query(
          `INSERT INTO rotation_runs (rotation_id, credential_id, workflow_id)
           SELECT $1, c, 'rotate:' || c FROM unnest($2::uuid[]) AS c ON CONFLICT DO NOTHING`,
          [input.sweepId, open.map((r) => r.id)],
        );
      }
      const last = rows.at(-1);
      return {
        selected: open.length,
        deferred: rows.length - open.length,
        next: rows.length === input.limit && last ? { at: last.at as string, id: last.id as string } : undefined,
      };
    },

    /**
     * Soft-deleted credentials past their retention are destroyed (their ciphertexts deleted);
     * rotation plans past any run's use are dropped (ROTATION_PLAN_DAYS), Idempotency-Keys past their
     * day, and what settled mail said and to whom past `mailRetentionDays` (default 30: a sweep
     * scheduled before the setting). Bounded in time (PURGE_BUDGET_MS, under the step's 20 s
     * limit): an attempt cut off by that limit went on destroying beside its retry (each auditing the
     * other's destroys as refusals), and a backlog failed the sweep once its retries ran out. What
     * is left (oldest first) goes to the next sweep's.
     */
    async purgeDeleted(input: { asOf: string; retentionDays: number; mailRetentionDays?: number; budgetMs?: number }): Promise<{ destroyed: number; erased: number; left: boolean }> {
      const deadline = Date.now() + (input.budgetMs ?? PURGE_BUDGET_MS);
      await deps.pool.query(`DELETE FROM rotation_plans WHERE planned_at < $1::timestamptz - make_interval(days => ${ROTATION_PLAN_DAYS})`, [input.asOf]);
      let left = false;
      /** Runs `page` until it does less than a page, or the time is up (then there is more left). */
      const pages = async (page: () => Promise<number>) => {
        let done = 0;
        for (let n = PURGE_PAGE; n === PURGE_PAGE; done += n) {
          if (done && Date.now() >= deadline) {
            left = true;
            break;
          }
          n = await page();
        }
        return done;
      };
      // One cutoff for the list and the check under the lock (days of 24 hours: the session's time
      // zone and its daylight-saving days do not move it between the two).
      const cutoff = new Date(Date.parse(input.asOf) - input.retentionDays * 86_400_000);
      // Page after page (keyed on deleted_at and id: as text, to the microsecond), while time is left:
      // kept ones (their rotations running) do not hide those after them. Before, one page of the
      // oldest was read, and a thousand kept ones held back every destroy behind them, sweep after sweep.
      let after: { at: string; id: string } | undefined;
      const credentials = async function* () {
        for (;;) {
          const { rows } = await deps.pool.query(
            `SELECT id, identity_id, deleted_at::text AS at FROM credentials
              WHERE deleted_at IS NOT NULL AND destroyed_at IS NULL AND deleted_at < $1
                AND ($2::timestamptz IS NULL OR (deleted_at, id) > ($2::timestamptz, $3::uuid))
              ORDER BY deleted_at, id LIMIT ${PURGE_PAGE}`,
            [cutoff, after?.at ?? null, after?.id ?? null],
          );
          yield* rows as { id: string; identity_id: string; at: string }[];
          if (rows.length < PURGE_PAGE) return;
          after = { at: rows.at(-1).at, id: rows.at(-1).id };
        }
      };
      let destroyed = 0;
      for await (const row of credentials()) {
        if (Date.now() >= deadline) {
          left = true;
          break;
        }
        heartbeat();
        // A rotation still running (in its grace period, say) reads the credential to revoke the
        // value it replaced once the grace period ends: destroyed before that, the revoke found
        // nothing, the replaced value kept working, and its notice could not be sent either. The
        // credential is kept until its run has ended (a later sweep's retention destroys it). Asked
        // as the destroy's check, as the API's destroy asks it: one that began after the answer is
        // seen by the destroy under its row lock (a 409 there, kept here too).
        const isRunning = async () => Boolean(deps.temporal) && (await statusOf(deps.temporal!.client.workflow.getHandle(`rotate:${row.id}`))) === 'RUNNING';
        // Asked first without the destroy (which audits a refusal): kept quietly, sweep after sweep, while it runs.
        if (await isRunning()) continue;
        const running = async () => {
          if (await isRunning()) throw new ConflictError(`the credential's rotation is running`);
        };
        try {
          // Checked again under the row lock: a credential restored since the list was read is kept.
          await deps.vault.destroy({ identityId: row.identity_id, actor: 'schedule:retention' }, { id: row.id }, { deletedBefore: cutoff, check: running });
          destroyed += 1;
        } catch (err) {
          if (!(err instanceof NotFoundError) && !(err instanceof ConflictError)) throw err;
        }
      }
      // Then, with what time is left (a page at least each): the expired Idempotency-Keys of identities
      // that keyed no request since (a backlog of them, first before, left no time for the destroys),
      // and what settled mail said (a backlog: every message kept before this setting).
      await pages(() => purgeExpiredKeys(deps.pool, PURGE_PAGE));
      const mailCutoff = new Date(Date.parse(input.asOf) - (input.mailRetentionDays ?? 30) * 86_400_000);
      const erased = await pages(() => eraseSettledMail(deps.pool, mailCutoff, PURGE_PAGE, [REFUSED_NOTICE, UNCHECKED_NOTICE]));
      return { destroyed, erased, left };
    },
  };
}

/** How long one retention step works before it leaves the rest to the next sweep's: well under databaseStep's 20 s. */
export const PURGE_BUDGET_MS = 10_000;
/** Credentials a retention step lists at a time, and Idempotency-Keys or messages it deletes or erases per statement. */
const PURGE_PAGE = 1_000;

/**
 * How long a rotation's plan (rotation_plans: the policy and dependents it works with) is kept: past
 * the longest a run can use it (a grace period of 30 days at most, an hour of revoke retries, a day
 * of notice retries), with room. A run still going after that (stuck) reads the credential's policy.
 */
export const ROTATION_PLAN_DAYS = 45;

async function summarise(deps: ActivityDeps, rotationId: string): Promise<RunSummary[]> {
  const { rows } = await deps.pool.query(
    `SELECT c.id, c.name, c.identity_id, c.owners, c.notify, c.next_rotation_at, i.email,
            ${RUN_OUTCOME_SQL} AS outcome, o.from_version, o.to_version, ${RUN_ERROR_SQL} AS error
       FROM rotation_runs r
       JOIN rotations ro ON ro.id = r.rotation_id
       JOIN credentials c ON c.id = r.credential_id
       JOIN identities i ON i.id = c.identity_id
       LEFT JOIN run_outcomes o ON o.run_id = r.run_id
      WHERE r.rotation_id = $1
      ORDER BY c.name`,
    [rotationId],
  );
  return rows.map((r) => ({
    credentialId: r.id,
    name: r.name,
    identityId: r.identity_id,
    recipients: [...new Set<string>([...r.owners, ...r.notify, ...(r.email ? [r.email] : [])])],
    // No outcome yet: a sweep stopped waiting for it (awaitOutcomes' `until`).
    outcome: r.outcome ?? 'running',
    fromVersion: r.from_version,
    toVersion: r.to_version,
    error: r.error,
    nextRotationAt: r.next_rotation_at ? r.next_rotation_at.toISOString() : null,
  }));
}

export function composeSummary(kind: string, reason: string | null, runs: RunSummary[]): { subject: string; text: string } {
  const rotated = runs.filter((r) => r.outcome === 'rotated');
  const running = runs.filter((r) => r.outcome === 'running');
  const failed = runs.filter((r) => r.outcome !== 'rotated' && r.outcome !== 'running');
  const line = (r: RunSummary) =>
    r.outcome === 'rotated'
      ? `  - ${r.name}: version ${r.fromVersion} → ${r.toVersion}; next due ${r.nextRotationAt ?? 'no policy'}`
      : `  - ${r.name}: ${r.outcome}${r.error ? ` — ${r.error}` : ''}; next due ${r.nextRotationAt ?? 'no policy'}`;
  const text = [
    kind === 'sweep' ? 'The scheduled rotation sweep ran.' : `The rotation batch you asked for finished${reason ? ` (${reason})` : ''}.`,
    '',
    `Rotated (${rotated.length}):`,
    ...(rotated.length ? rotated.map(line) : ['  (none)']),
    '',
    `Failed or not rotated (${failed.length}):`,
    ...(failed.length ? failed.map(line) : ['  (none)']),
    '',
    ...(running.length
      ? [`Still rotating when the sweep stopped waiting (${running.length}); each sends its own notice when it ends:`, ...running.map((r) => `  - ${r.name}`), '']
      : []),
    'This summary never contains a secret. Read new values with vault.get.',
  ].join('\n');
  const subject = `[mailgent] ${kind === 'sweep' ? 'Scheduled rotation' : 'Rotation batch'}: ${rotated.length} rotated, ${failed.length} failed`;
  return { subject, text };
}

const WEEKDAYS = ['Sun', 'Mon', 'Tue', 'Wed', 'Thu', 'Fri', 'Sat'];

/** One formatter per time zone: making one costs far more than using it, and a sweep page checks hundreds of windows. */
const dayAndHour = new Map<string, Intl.DateTimeFormat>();

/** Whether `at` falls in the window's days and [startHour, endHour) in its time zone. */
export function windowOpen(window: RotationWindow, at: Date): boolean {
  let format = dayAndHour.get(window.timezone);
  if (!format) {
    format = new Intl.DateTimeFormat('en-US', { timeZone: window.timezone, weekday: 'short', hour: 'numeric', hourCycle: 'h23' });
    dayAndHour.set(window.timezone, format);
  }
  const parts = format.formatToParts(at);
  const day = WEEKDAYS.indexOf(parts.find((p) => p.type === 'weekday')!.value);
  const hour = Number(parts.find((p) => p.type === 'hour')!.value);
  if (window.startHour <= window.endHour) return window.days.includes(day) && hour >= window.startHour && hour < window.endHour;
  // Past midnight: the hours after it belong to the window of the day it started on (Friday 22–2
  // runs from Friday 22:00 to Saturday 02:00).
  if (hour >= window.startHour) return window.days.includes(day);
  return hour < window.endHour && window.days.includes((day + 6) % 7);
}
