-- Up Migration

-- Whether each of a batch's runs is open: started (its run recorded) and without an outcome, and an
-- index of the open ones: the runs a batch's wait polls every second and a wave counts against its
-- open places. Both read every started run of the batch and looked each up in run_outcomes: for a
-- sweep of 100,000 due credentials, ~35-60 ms a poll once 90,000 had ended (two parallel workers),
-- growing with every run the sweep finished. Kept by triggers, so every way an outcome is recorded
-- (the run's own, the wait's for a run that ended without one) and every way a run is recorded (a
-- wave's start, a start taken over, a joined run, a run reset to start again) sets it.
-- One flag, not "started" and "ended" apart: few runs are open at any time (a batch keeps at most
-- 50), so the planner's estimate from the flag's statistics stays small and the outcome is looked
-- up for each of those rows; from two flags taken for independent it expected thousands and
-- scanned every outcome instead.
-- A flag that says open of a run whose outcome a concurrent transaction was recording (its run id
-- recorded meanwhile) is harmless: readers still look up the outcome of each row the index gives
-- them. Through the service's own writes (it never deletes an outcome) a flag never says not open
-- of a started run without a committed outcome.
-- run_outcomes first: a wait's INSERT INTO run_outcomes … SELECT … FROM rotation_runs locks them in
-- that order, and the other order (the ALTER's, then the trigger's on run_outcomes) could deadlock with it.
LOCK TABLE run_outcomes IN SHARE ROW EXCLUSIVE MODE;

ALTER TABLE rotation_runs ADD COLUMN open boolean NOT NULL DEFAULT false;

UPDATE rotation_runs r SET open = true WHERE r.run_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM run_outcomes o WHERE o.run_id = r.run_id);

CREATE FUNCTION rotation_runs_open() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  NEW.open := NEW.run_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM run_outcomes o WHERE o.run_id = NEW.run_id);
  RETURN NEW;
END
$$;

CREATE TRIGGER rotation_runs_open BEFORE INSERT OR UPDATE OF run_id ON rotation_runs FOR EACH ROW EXECUTE FUNCTION rotation_runs_open();

CREATE FUNCTION run_outcomes_close_runs() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'DELETE' THEN
    UPDATE rotation_runs SET open = true WHERE run_id = OLD.run_id AND NOT open;
    RETURN OLD;
  END IF;
  -- IS NOT FALSE, not `AND open`: that would let the plan take the index of open runs (all of them,
  -- read for each outcome) instead of the run's own rows by rotation_runs_run.
  UPDATE rotation_runs SET open = false WHERE run_id = NEW.run_id AND open IS NOT FALSE;
  RETURN NEW;
END
$$;

CREATE TRIGGER run_outcomes_close_runs AFTER INSERT OR DELETE ON run_outcomes FOR EACH ROW EXECUTE FUNCTION run_outcomes_close_runs();

CREATE INDEX rotation_runs_open ON rotation_runs (rotation_id) WHERE open;

-- The new column's statistics now: without them the planner takes half of a batch's runs for open
-- until autovacuum analyzes the table, and reads every outcome on each poll of a sweep running then.
ANALYZE rotation_runs;
