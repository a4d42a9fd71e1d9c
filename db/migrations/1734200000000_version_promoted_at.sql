-- Up Migration

-- When a rotation's pending version was promoted. A promote retried after its first attempt
-- committed (the answer lost with a worker) must answer as done, even once values were stored on
-- top of it: its labels (current, previous) no longer tell, this does. Versions promoted before
-- this column have none; for them the previous label still tells, after one store on top.
ALTER TABLE secret_versions ADD COLUMN promoted_at timestamptz;
