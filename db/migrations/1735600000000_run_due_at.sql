-- Up Migration

-- When each of a batch's runs fell due (its credential's next_rotation_at as the run was added), and
-- an index of the runs still waiting to start, in the order a wave starts them (a start sent but not
-- recorded first, then the most overdue). Every wave of a batch took its next ones by reading all of
-- the batch's runs, joining each to its credential and sorting them by next_rotation_at: for a sweep
-- of 100,000 due credentials, 200-300 ms and a sort spilled to disk, on nearly every one-second poll
-- of the sweep's wait while its runs finished. Set by a trigger, so every way a run is added (a
-- sweep's selection, its password policies, an agent's batch, a leak report) sets it.
ALTER TABLE rotation_runs ADD COLUMN due_at timestamptz;

CREATE FUNCTION rotation_runs_due_at() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.due_at IS NULL THEN
    SELECT c.next_rotation_at INTO NEW.due_at FROM credentials c WHERE c.id = NEW.credential_id;
  END IF;
  RETURN NEW;
END
$$;

CREATE TRIGGER rotation_runs_due_at BEFORE INSERT ON rotation_runs FOR EACH ROW EXECUTE FUNCTION rotation_runs_due_at();

UPDATE rotation_runs r SET due_at = c.next_rotation_at FROM credentials c WHERE c.id = r.credential_id AND r.run_id IS NULL;

CREATE INDEX rotation_runs_waiting ON rotation_runs (rotation_id, (start_sent_at IS NULL), due_at, credential_id) WHERE run_id IS NULL AND cancelled_at IS NULL;
