-- Up Migration

-- A left-over incident's still-live version that the incident replacing it must have revoked too
-- (its run ended before revoking it: terminated after its promotion, say). Kept on the replacing
-- incident: before, it was passed only to the start of that incident's rotation, in memory, so a
-- start that failed (a 503, reported again) or the sweep's resumption of the incident lost it, and
-- the leaked value kept working with no incident open for it.
ALTER TABLE leak_incidents ADD COLUMN left_over int;
