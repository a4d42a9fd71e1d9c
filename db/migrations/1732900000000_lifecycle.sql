-- Up Migration

-- Credential policy: who owns it, what depends on it, who hears about it.
ALTER TABLE credentials
  ADD COLUMN service           text,
  ADD COLUMN tags              text[] NOT NULL DEFAULT '{}',
  ADD COLUMN dependents        jsonb NOT NULL DEFAULT '[]',
  ADD COLUMN notify            text[] NOT NULL DEFAULT '{}',
  -- When the current version is due for rotation (NULL without a policy). Kept on the row so the
  -- sweep finds due credentials with one index scan.
  ADD COLUMN next_rotation_at  timestamptz,
  ADD COLUMN deleted_at        timestamptz,
  ADD COLUMN destroyed_at      timestamptz;

-- next_rotation_at follows the current version's age and the policy; triggers keep it so, whoever
-- writes (the vault, a rotation, an operator's fix).
-- Due at the end of the period, or earlier when the credential expires within the policy's lead time.
CREATE FUNCTION next_rotation_of(p_credential uuid, p_version int, p_rotation jsonb, p_expires timestamptz, p_destroyed timestamptz)
RETURNS timestamptz
LANGUAGE sql STABLE AS $$
  SELECT CASE WHEN p_rotation IS NULL OR p_destroyed IS NOT NULL THEN NULL
              ELSE least(
                (SELECT v.created_at + make_interval(days => (p_rotation->>'periodDays')::int)
                   FROM secret_versions v WHERE v.credential_id = p_credential AND v.version = p_version),
                p_expires - make_interval(days => coalesce((p_rotation->>'expiryLeadDays')::int, 7))) END
$$;

CREATE FUNCTION credentials_next_rotation() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  NEW.next_rotation_at := next_rotation_of(NEW.id, NEW.current_version, NEW.rotation, NEW.expires_at, NEW.destroyed_at);
  RETURN NEW;
END
$$;
CREATE TRIGGER credentials_next_rotation BEFORE INSERT OR UPDATE OF current_version, rotation, expires_at, destroyed_at ON credentials
  FOR EACH ROW EXECUTE FUNCTION credentials_next_rotation();

CREATE FUNCTION secret_versions_next_rotation() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  UPDATE credentials SET current_version = current_version WHERE id = NEW.credential_id AND current_version = NEW.version;
  RETURN NULL;
END
$$;
CREATE TRIGGER secret_versions_next_rotation AFTER INSERT OR UPDATE OF created_at ON secret_versions
  FOR EACH ROW EXECUTE FUNCTION secret_versions_next_rotation();

UPDATE credentials SET current_version = current_version;

CREATE INDEX credentials_due ON credentials (next_rotation_at, id) WHERE deleted_at IS NULL AND next_rotation_at IS NOT NULL;
CREATE INDEX credentials_expiring ON credentials (expires_at, id) WHERE deleted_at IS NULL AND expires_at IS NOT NULL;

ALTER TABLE secret_versions
  -- The provider's own id for this secret (an API key id, a role name); never secret.
  ADD COLUMN provider_ref  text,
  -- HMAC(fingerprint key, SHA-256(value)): finds a leaked value's version without decrypting anything.
  ADD COLUMN fingerprint   bytea,
  ADD COLUMN revoked_at    timestamptz;
CREATE INDEX secret_versions_fingerprint ON secret_versions (fingerprint) WHERE fingerprint IS NOT NULL;

-- Keys of the service itself (the fingerprint key), wrapped by the master key like data keys.
CREATE TABLE service_keys (
  name           text PRIMARY KEY,
  master_key_id  text NOT NULL,
  wrapped        bytea NOT NULL,
  created_at     timestamptz NOT NULL DEFAULT now()
);

-- Read access to one credential, given by its owner to another identity.
CREATE TABLE grants (
  id             uuid PRIMARY KEY,
  credential_id  uuid NOT NULL REFERENCES credentials (id),
  grantee_id     uuid NOT NULL REFERENCES identities (id),
  created_at     timestamptz NOT NULL DEFAULT now(),
  revoked_at     timestamptz
);
CREATE UNIQUE INDEX grants_active ON grants (credential_id, grantee_id) WHERE revoked_at IS NULL;
CREATE INDEX grants_grantee ON grants (grantee_id) WHERE revoked_at IS NULL;

ALTER TABLE rotations
  ADD COLUMN kind         text NOT NULL DEFAULT 'request' CHECK (kind IN ('request', 'sweep', 'leak', 'policy')),
  ADD COLUMN workflow_id  text;

-- A sweep spans identities.
ALTER TABLE rotations ALTER COLUMN identity_id DROP NOT NULL;

-- How each rotation run ended (written by the run itself, keyed by its run id, so a batch that
-- joined a run someone else started still learns its outcome).
CREATE TABLE run_outcomes (
  run_id         text PRIMARY KEY,
  workflow_id    text NOT NULL,
  credential_id  uuid NOT NULL REFERENCES credentials (id),
  outcome        text NOT NULL CHECK (outcome IN ('rotated', 'failed', 'cancelled', 'rolled_back')),
  from_version   int,
  to_version     int,
  error          text,
  finished_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX rotation_runs_run ON rotation_runs (run_id);

-- Leak reports; one open incident per credential gathers duplicate reports into one rotation.
CREATE TABLE leak_incidents (
  id             uuid PRIMARY KEY,
  credential_id  uuid NOT NULL REFERENCES credentials (id),
  identity_id    uuid NOT NULL REFERENCES identities (id),
  version        int,
  status         text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'closed')),
  reports        int NOT NULL DEFAULT 1,
  source         text NOT NULL,
  opened_at      timestamptz NOT NULL DEFAULT now(),
  closed_at      timestamptz
);
CREATE UNIQUE INDEX leak_incidents_open ON leak_incidents (credential_id) WHERE status = 'open';

-- Per-identity password policy.
CREATE TABLE password_policies (
  identity_id          uuid PRIMARY KEY REFERENCES identities (id),
  max_age_days         int NOT NULL,
  length               int NOT NULL,
  lowercase            boolean NOT NULL,
  uppercase            boolean NOT NULL,
  digits               boolean NOT NULL,
  symbols              boolean NOT NULL,
  escalate_after_days  int NOT NULL,
  updated_at           timestamptz NOT NULL DEFAULT now()
);

-- A destroyed credential's name is free again; a soft-deleted one keeps it until restored or destroyed.
ALTER TABLE credentials DROP CONSTRAINT credentials_identity_id_name_key;
CREATE UNIQUE INDEX credentials_name ON credentials (identity_id, name) WHERE destroyed_at IS NULL;

CREATE INDEX audit_log_reads ON audit_log (credential_id, at) WHERE action IN ('vault.get', 'vault.totp') AND outcome = 'ok';
