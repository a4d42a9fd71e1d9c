-- Up Migration

-- A message the SMTP server accepted for some recipients and refused for others is sent (sending it
-- again would reach the accepted ones twice); the refused addresses are kept here, their replies in
-- last_error and in the sender's audit log (action mail.recipients_refused).
ALTER TABLE mail_outbox ADD COLUMN refused text[] NOT NULL DEFAULT '{}';
