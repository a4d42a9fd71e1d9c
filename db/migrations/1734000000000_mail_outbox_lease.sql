-- Up Migration

-- A delivery attempt claims its message for a while before it talks to the SMTP server. An attempt
-- can outlive its activity's start-to-close timeout (a slow relay: the mailer's own timeouts add up
-- to more), and the retry Temporal starts then would find the message still queued and send it a
-- second time. Now the retry finds it claimed, and waits (a retryable failure) until the first
-- attempt has marked it sent, given it back after a failure, or let the claim lapse (a dead worker).
ALTER TABLE mail_outbox ADD COLUMN lease_until timestamptz;
