-- Up Migration

-- A credential whose rotation was cancelled or rolled back is not rotated again by the next hourly
-- sweep (its owners stopped that rotation, or undid it because the new value broke something): it
-- waits a day, as one whose rotation failed does. The sweep's selection looks for such an outcome
-- per due credential (the partial index: those outcomes only, so a vault with years of rotated
-- ones is not scanned, nor is it cheaper to scan them all than to look), and a wave for any
-- outcome recorded since its sweep began (the full one).
CREATE INDEX run_outcomes_credential ON run_outcomes (credential_id, finished_at);
CREATE INDEX run_outcomes_held ON run_outcomes (credential_id, finished_at) WHERE outcome IN ('cancelled', 'rolled_back');
