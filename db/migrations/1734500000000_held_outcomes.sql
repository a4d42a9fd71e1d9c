-- Up Migration

-- The sweep's selection looks, for each due credential, for a rotation of it that did not rotate
-- (failed, cancelled or rolled back) in the last day: such a credential waits a day, not an hour.
-- A failed outcome counts too: a run that ended without reporting one (terminated, timed out) is
-- recorded as failed by its batch but leaves the credential `rotating`, not `rotation_failed`.
-- This partial index holds those outcomes only, so a vault with years of rotated ones is not
-- scanned, nor is it cheaper to scan them all than to look. (An earlier copy of the 1734400000000
-- migration made it for cancelled and rolled-back outcomes only: it is replaced here.)
DROP INDEX IF EXISTS run_outcomes_held;
CREATE INDEX run_outcomes_held ON run_outcomes (credential_id, finished_at) WHERE outcome <> 'rotated';
