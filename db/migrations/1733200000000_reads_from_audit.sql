-- Up Migration

-- A credential's last read is the audit log's: its newest successful vault.get or vault.totp row
-- (the audit_log_reads index answers it). The copy kept in credentials.last_accessed_at was an UPDATE
-- of the credential's row on every read batch: a row lock taken by each read, a new row version per
-- batch on the most-read credentials, and a third of the batch's database time.
ALTER TABLE credentials DROP COLUMN last_accessed_at;
