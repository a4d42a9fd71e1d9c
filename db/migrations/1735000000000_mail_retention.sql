-- Up Migration

-- Mail retention (MAIL_RETENTION_DAYS): a message settled (sent or abandoned) that long ago keeps
-- its id, identity, purpose, status, attempts and times (the id is what keeps a notice from going
-- out twice, and an escalation reads when its reminder was sent), and loses its recipients,
-- subject, bodies, refused recipients and SMTP errors (addresses): before, they were kept for good.
ALTER TABLE mail_outbox ADD COLUMN erased_at timestamptz;
CREATE INDEX mail_outbox_unerased ON mail_outbox (created_at) WHERE erased_at IS NULL;
