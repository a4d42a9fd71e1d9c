-- Up Migration

-- mail.send's Idempotency-Key: a client that repeats a request whose answer it lost (a timeout, a
-- dropped connection, a 503 it cannot tell from one that was carried out) gets the message the first
-- made, not a second email. One row per identity and key, committed with the message it names; the
-- message's own row (mail_outbox) holds what was sent, to tell a repeat from another message under
-- the same key. A key is honoured for 24 hours, then may name a new message.
CREATE TABLE mail_idempotency (
  identity_id  uuid NOT NULL REFERENCES identities (id),
  key          text NOT NULL,
  message_id   uuid NOT NULL REFERENCES mail_outbox (id),
  created_at   timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (identity_id, key)
);
