-- Up Migration

-- An open incident is joined by later reports while its run is running, and, once no run is, while
-- it is younger than a minute: its run may still be starting. That made a report within a minute
-- of an incident whose run had already ended (terminated, or failed before it closed the incident)
-- join an incident nothing would close. Each incident now names the rotation opened with it; once
-- that rotation's run has been started (rotation_runs.run_id) and no run is running, the report is
-- answered afresh at once, whatever the incident's age. Incidents opened before this have no
-- rotation and keep the age rule.
--
-- The incident is inserted before its rotation (only a new incident has one), so the key is checked
-- at commit.
ALTER TABLE leak_incidents ADD COLUMN rotation_id uuid REFERENCES rotations (id) DEFERRABLE INITIALLY DEFERRED;
