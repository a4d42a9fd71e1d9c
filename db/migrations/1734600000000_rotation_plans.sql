-- Up Migration

-- What a rotation works with, as it was when the rotation planned: its policy (provider, settings,
-- grace) and its dependents. Every step of the run read them afresh from the credential before, so
-- a policy changed mid-rotation (PATCH, or a store that sets policy) split the run between two:
-- taken out of rotation during its grace period, its old value was "revoked" by the default
-- provider, which does nothing, and recorded revoked while it still worked at the real one; a
-- dependent removed from the list moved the others' indexes, and a failed attempt restored the
-- wrong system. A change now applies from the next rotation. One row per run (workflow id and
-- rotation id); a run that planned before this table existed has none, and reads the credential.
CREATE TABLE rotation_plans (
  workflow_id   text NOT NULL,
  rotation_id   text NOT NULL,
  credential_id uuid NOT NULL REFERENCES credentials (id),
  rotation      jsonb,
  dependents    jsonb NOT NULL,
  planned_at    timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (workflow_id, rotation_id)
);
