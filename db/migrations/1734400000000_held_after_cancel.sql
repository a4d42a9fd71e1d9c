-- Up Migration

-- A credential whose rotation was cancelled or rolled back is not rotated again by the next hourly
-- sweep (its owners stopped that rotation, or undid it because the new value broke something): it
-- waits a day, as one whose rotation failed does. The sweep's selection looks for such an outcome
-- per due credential, and a wave for any outcome recorded since its sweep began: by this index.
CREATE INDEX run_outcomes_credential ON run_outcomes (credential_id, finished_at);
