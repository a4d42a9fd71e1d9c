-- Up Migration

-- Idempotency-Key (mail.send, POST /v1/rotations): a client that repeats a request whose answer it
-- lost (a timeout, a dropped connection, a 503 it cannot tell from one that was carried out) gets
-- what the first request made (its message, its rotation), not a second email or a second batch.
-- One row per identity, action and key, committed with what it names; `request` is the SHA-256 of
-- the request, to tell a repeat from another request under the same key. A key is honoured for 24
-- hours, then may name something new.
CREATE TABLE idempotency_keys (
  identity_id  uuid NOT NULL REFERENCES identities (id),
  action       text NOT NULL,
  key          text NOT NULL,
  target_id    uuid NOT NULL,
  request      bytea NOT NULL,
  created_at   timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (identity_id, action, key)
);
CREATE INDEX idempotency_keys_target ON idempotency_keys (target_id);

-- A repeat of a rotation request (by its key) that found its batch not yet started took the start
-- over: the first request's start, failing after that, no longer cancels the rotation (the repeat
-- has started the batch, or its own repeat will).
ALTER TABLE rotations ADD COLUMN start_taken_over_at timestamptz;
