-- Up Migration

-- A sweep's run cancelled by its credential's owner before it started (DELETE /v1/rotations/:id of a
-- sweep cancels the caller's runs alone, not the sweep): its waves never start it, a later selection
-- in the same sweep (another page, the password policy's pass) does not put it back, and it reads
-- cancelled. (A whole batch's cancel is rotations.cancelled_at.)
ALTER TABLE rotation_runs ADD COLUMN cancelled_at timestamptz;
