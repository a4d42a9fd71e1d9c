/**
 * A batch run's outcome and error in SQL, over `rotation_runs r`, `rotations ro` and
 * `run_outcomes o` (left-joined on the run id): the run's own, or `cancelled` for a run that its
 * batch's cancellation kept from starting (a batch starts its rotations in waves). One definition
 * for the batch's wait and summary (activities/batch.ts) and for GET /v1/rotations/:id.
 */
const NEVER_STARTED = 'r.run_id IS NULL AND ro.cancelled_at IS NOT NULL';

export const RUN_OUTCOME_SQL = `coalesce(o.outcome, CASE WHEN ${NEVER_STARTED} THEN 'cancelled' END)`;
export const RUN_ERROR_SQL = `coalesce(o.error, CASE WHEN ${NEVER_STARTED} THEN 'the batch was cancelled before this rotation started' END)`;
