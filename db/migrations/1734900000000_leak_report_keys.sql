-- Up Migration

-- Idempotency-Key for leak reports (POST /v1/leaks, MCP report_leak): a reporter that repeats a
-- report whose answer it lost gets the first report's answer back, instead of a second incident and
-- a second rotation of a credential whose leak was answered meanwhile (a report by name names the
-- current version: after the first's rotation, the new value). A report touches several
-- credentials in several transactions and Temporal, so what it acts on and its answer are kept with
-- its key (`answer`: {pinned: the credentials and versions it resolved, answer: its results once
-- answered}; ids, versions and actions, never a value): a repeat gets the answer, or, none kept,
-- acts on the versions pinned. The admin reports
-- for no identity: its keys are kept under the nil UUID, so a key's identity is no longer a foreign
-- key (identities are never deleted).
ALTER TABLE idempotency_keys DROP CONSTRAINT IF EXISTS idempotency_keys_identity_id_fkey;
ALTER TABLE idempotency_keys ADD COLUMN answer jsonb;
