-- Up Migration

CREATE TABLE identities (
  id          uuid PRIMARY KEY,
  name        text NOT NULL UNIQUE,
  email       text,
  token_hash  bytea NOT NULL UNIQUE,
  created_at  timestamptz NOT NULL DEFAULT now()
);

-- One data key per identity (more once keys are rotated), wrapped by a master key that never
-- reaches the database; master_key_id says which.
CREATE TABLE data_keys (
  id             uuid PRIMARY KEY,
  identity_id    uuid NOT NULL REFERENCES identities (id),
  master_key_id  text NOT NULL,
  wrapped        bytea NOT NULL,
  created_at     timestamptz NOT NULL DEFAULT now(),
  retired_at     timestamptz
);
CREATE INDEX data_keys_active ON data_keys (identity_id, created_at DESC) WHERE retired_at IS NULL;

-- The version labels of AWS Secrets Manager (current, previous, pending) are pointers on the
-- credential row, so a label moves in one row update and can never be on two versions at once.
CREATE TABLE credentials (
  id                uuid PRIMARY KEY,
  identity_id       uuid NOT NULL REFERENCES identities (id),
  name              text NOT NULL,
  kind              text NOT NULL CHECK (kind IN ('api_key', 'password', 'token', 'totp_seed', 'service_account', 'generic')),
  metadata          jsonb NOT NULL DEFAULT '{}',
  owners            text[] NOT NULL DEFAULT '{}',
  rotation          jsonb,
  expires_at        timestamptz,
  status            text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'rotating', 'rotation_failed')),
  current_version   int NOT NULL,
  previous_version  int,
  pending_version   int,
  created_at        timestamptz NOT NULL DEFAULT now(),
  updated_at        timestamptz NOT NULL DEFAULT now(),
  last_accessed_at  timestamptz,
  UNIQUE (identity_id, name)
);
CREATE INDEX credentials_identity_kind ON credentials (identity_id, kind);

CREATE TABLE secret_versions (
  credential_id  uuid NOT NULL REFERENCES credentials (id),
  version        int NOT NULL CHECK (version > 0),
  data_key_id    uuid NOT NULL REFERENCES data_keys (id),
  sealed         bytea NOT NULL,
  -- Idempotency key of the rotation step that created this version (a retried step finds it).
  rotation_key   text UNIQUE,
  -- For a pending version: the version that was current when it was made.
  based_on       int,
  created_at     timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (credential_id, version)
);

CREATE TABLE mail_outbox (
  id           uuid PRIMARY KEY,
  identity_id  uuid REFERENCES identities (id),
  purpose      text NOT NULL,
  recipients   text[] NOT NULL,
  subject      text NOT NULL,
  text_body    text NOT NULL,
  html_body    text,
  status       text NOT NULL DEFAULT 'queued' CHECK (status IN ('queued', 'sent', 'abandoned')),
  attempts     int NOT NULL DEFAULT 0,
  last_error   text,
  created_at   timestamptz NOT NULL DEFAULT now(),
  sent_at      timestamptz
);

CREATE TABLE rotations (
  id           uuid PRIMARY KEY,
  identity_id  uuid NOT NULL REFERENCES identities (id),
  reason       text,
  notify       text[] NOT NULL DEFAULT '{}',
  created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE rotation_runs (
  rotation_id    uuid NOT NULL REFERENCES rotations (id),
  credential_id  uuid NOT NULL REFERENCES credentials (id),
  workflow_id    text NOT NULL,
  run_id         text,
  PRIMARY KEY (rotation_id, credential_id)
);

-- The audit log: append-only and hash-chained. Rows are chained by a trigger, so no code path
-- can insert an unchained row; the advisory lock serialises appends so seq order is chain order.
CREATE SEQUENCE audit_log_seq;

CREATE TABLE audit_log (
  seq            bigint PRIMARY KEY,
  at             timestamptz NOT NULL,
  identity_id    uuid,
  actor          text NOT NULL,
  action         text NOT NULL,
  credential_id  uuid,
  outcome        text NOT NULL CHECK (outcome IN ('ok', 'denied', 'rejected', 'conflict', 'failed')),
  request_id     text,
  detail         jsonb NOT NULL DEFAULT '{}',
  prev_hash      bytea NOT NULL,
  hash           bytea NOT NULL
);
CREATE INDEX audit_log_identity ON audit_log (identity_id, seq);
CREATE INDEX audit_log_credential ON audit_log (credential_id, seq);

CREATE FUNCTION audit_payload(a audit_log) RETURNS bytea
LANGUAGE sql STABLE AS $$
  SELECT convert_to(
    jsonb_build_array(
      a.seq, floor(extract(epoch FROM a.at) * 1000000)::bigint, a.identity_id, a.actor, a.action,
      a.credential_id, a.outcome, a.request_id, a.detail
    )::text,
    'UTF8')
$$;

CREATE FUNCTION audit_log_chain() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
  last_hash bytea;
BEGIN
  PERFORM pg_advisory_xact_lock(4631800001);
  SELECT hash INTO last_hash FROM audit_log ORDER BY seq DESC LIMIT 1;
  NEW.seq := nextval('audit_log_seq');
  NEW.at := clock_timestamp();
  NEW.prev_hash := coalesce(last_hash, '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea);
  NEW.hash := sha256(NEW.prev_hash || audit_payload(NEW));
  RETURN NEW;
END
$$;

CREATE TRIGGER audit_log_chain BEFORE INSERT ON audit_log
  FOR EACH ROW EXECUTE FUNCTION audit_log_chain();

CREATE FUNCTION audit_log_refuse() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'audit_log is append-only: % is refused', TG_OP USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log
  FOR EACH ROW EXECUTE FUNCTION audit_log_refuse();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
  FOR EACH STATEMENT EXECUTE FUNCTION audit_log_refuse();
