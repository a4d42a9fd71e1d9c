import type { Db } from './pool';

/**
 * A batch run's outcome and error in SQL, over `rotation_runs r`, `rotations ro` and
 * `run_outcomes o` (left-joined on the run id): the run's own, or `cancelled` for a run that its
 * batch's cancellation, or its owner's cancel of it in a sweep, kept from starting (a batch starts
 * its rotations in waves). One definition for the batch's wait and summary (activities/batch.ts)
 * and for GET /v1/rotations/:id.
 */
const NEVER_STARTED = 'r.run_id IS NULL AND (ro.cancelled_at IS NOT NULL OR r.cancelled_at IS NOT NULL)';

/**
 * A sweep's credential changed since the sweep began, over `credentials c` and `rotations ro` (the
 * sweep's): deleted, taken out of
 * rotation, edited (a failure marks it too), a value stored or promoted since, or a run of it ended
 * since. Rotating it would make a second key and a second notice (or give a credential without a
 * policy a generated value); the next sweep selects it again if it is still due. Asked by a sweep's
 * wave before it starts a run (activities/batch.ts) and by the run at its plan (activities/rotation.ts),
 * since a run of another's may end between the two.
 */
export const CHANGED_SINCE_SWEEP_SQL = `(c.deleted_at IS NOT NULL OR c.rotation IS NULL OR c.updated_at > ro.created_at
  OR EXISTS (SELECT 1 FROM secret_versions v WHERE v.credential_id = c.id AND v.version = c.current_version AND coalesce(v.promoted_at, v.created_at) > ro.created_at)
  OR EXISTS (SELECT 1 FROM run_outcomes o WHERE o.credential_id = c.id AND o.finished_at > ro.created_at))`;

/**
 * A batch's open runs, started and without an outcome (rotation_id, workflow_id, run_id): what its
 * wait polls and its waves count against their open places, of the batch whose id the parameter
 * `rotationId` names. The flag `open`, kept by triggers (db/migrations/1735700000000_run_open.sql),
 * lets the index rotation_runs_open give these few rows, where every run the batch had started was
 * read and looked up in run_outcomes (~35-60 ms a poll once 90,000 of a sweep's runs had ended).
 * Each row's outcome is still looked up, since a flag may say open of a run whose outcome was
 * recorded as its run was.
 */
export const openRunsOf = (rotationId: string) => `(
  SELECT r.rotation_id, r.workflow_id, r.run_id FROM rotation_runs r
   WHERE r.rotation_id = ${rotationId} AND r.open AND NOT EXISTS (SELECT 1 FROM run_outcomes o WHERE o.run_id = r.run_id))`;

/**
 * A batch's recorded run (over `rotation_runs r`) that it joined, not started: a run another batch
 * (a sweep, an agent's, a leak's) recorded first, begun before this batch was. Such a run is that
 * batch's to count among its open ones, not this one's: a run that never ends (stuck on a bug, a
 * non-deterministic deploy) is joined by every sweep after the one that started it, since its
 * credential stays due, and counted as theirs it took their open places, sweep after sweep, until
 * none was left to start anything else.
 */
export const JOINED_EARLIER_SQL = `(r.run_id IS NOT NULL AND EXISTS (
  SELECT 1 FROM rotation_runs e JOIN rotations eo ON eo.id = e.rotation_id JOIN rotations mine ON mine.id = r.rotation_id
   WHERE e.run_id = r.run_id AND e.rotation_id <> r.rotation_id AND eo.created_at < mine.created_at))`;

/**
 * Whether the run a sweep's start joined had recorded its outcome before the sweep began: a run in
 * its grace period, promoted (`rotated`) before, whose credential fell due again meanwhile (its period
 * shortened during the grace, a password policy's age under the grace, an expiry moved into the
 * lead). It is not this sweep's rotation: recorded as the sweep's, it was reported rotated again by
 * every hourly sweep until its grace ended, each summary saying a rotation that did not happen.
 */
export async function outcomeBefore(db: Db, rotationId: string, runId: string): Promise<boolean> {
  const { rows } = await db.query('SELECT 1 FROM run_outcomes o JOIN rotations ro ON ro.id = $1 WHERE o.run_id = $2 AND o.finished_at <= ro.created_at', [rotationId, runId]);
  return rows.length > 0;
}

export const RUN_OUTCOME_SQL = `coalesce(o.outcome, CASE WHEN ${NEVER_STARTED} THEN 'cancelled' END)`;
export const RUN_ERROR_SQL = `coalesce(o.error, CASE WHEN ${NEVER_STARTED} THEN CASE WHEN ro.cancelled_at IS NOT NULL THEN 'the batch was cancelled before this rotation started' ELSE 'its owner cancelled it before it started' END END)`;

/**
 * Records the run a batch row's start made (its first run's id), unless a run is recorded for it
 * already: whether this call recorded it, and whether the batch (or the row: its owner's cancel in
 * a sweep) is cancelled (a run recorded after the cancel listed the batch's runs is the recorder's
 * to cancel). One statement for the wave that
 * started the run, the batch's wait and the cancel that take over a start sent but unrecorded.
 */
export async function recordBatchRun(db: Db, rotationId: string, credentialId: string, runId: string): Promise<{ recorded: boolean; cancelled: boolean }> {
  const { rows } = await db.query(
    `UPDATE rotation_runs r SET run_id = $3 FROM rotations ro
      WHERE r.rotation_id = $1 AND r.credential_id = $2 AND r.run_id IS NULL AND ro.id = r.rotation_id
      RETURNING ro.cancelled_at IS NOT NULL OR r.cancelled_at IS NOT NULL AS cancelled`,
    [rotationId, credentialId, runId],
  );
  return { recorded: rows.length > 0, cancelled: rows[0]?.cancelled === true };
}
