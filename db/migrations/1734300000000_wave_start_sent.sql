-- Up Migration

-- When a wave sent the start of a run's workflow (before it records the run's id). A sweep's wave
-- checks, before it starts a credential's rotation, that the credential is still due: one rotated
-- meanwhile (by an agent's batch, a leak, the previous sweep's run that was still going) would
-- otherwise be rotated twice. A wave that dies between the start and recording it is run again,
-- and must re-send that start (Temporal answers with the run it started) even though the rotation
-- it started has made the credential not due: this column tells the two apart.
ALTER TABLE rotation_runs ADD COLUMN start_sent_at timestamptz;
