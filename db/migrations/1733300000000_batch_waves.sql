-- Up Migration

-- A batch starts its rotations in waves (at most BATCH_MAX_OPEN_ROTATIONS open at once), so a run
-- may wait unstarted (rotation_runs.run_id NULL) for a while. Cancelling the batch records the time
-- here: no waiting run starts after it, and a run that never started counts as cancelled.
ALTER TABLE rotations ADD COLUMN cancelled_at timestamptz;
