-- Up Migration

-- The recipients a queued message has reached so far. An SMTP server that takes a message for some
-- recipients and defers others (a 4xx reply: greylisting, a full queue, too many recipients) asks
-- for it to be sent to those again later: the message stays queued, and each later attempt sends it
-- to the recipients neither reached nor refused for good (`refused`: 5xx replies). Before, such a
-- message was marked sent, and the deferred recipients never got it.
ALTER TABLE mail_outbox ADD COLUMN delivered text[] NOT NULL DEFAULT '{}';
