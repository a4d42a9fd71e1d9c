-- Up Migration

-- A TOTP seed version's keyed fingerprint is now of its base32 seed, not of the otpauth URI it is
-- stored as: the seed is what is pasted where a name goes, and what a leak report's SHA-256 is of.
-- The versions stored before are listed here, to be fingerprinted again by the services once they
-- start (vault/seed-fingerprints.ts: it needs the keyring to open them, which a migration has not).
CREATE TABLE seed_fingerprints_pending (
  credential_id  uuid NOT NULL,
  version        int NOT NULL,
  PRIMARY KEY (credential_id, version)
);
INSERT INTO seed_fingerprints_pending (credential_id, version)
  SELECT v.credential_id, v.version FROM secret_versions v JOIN credentials c ON c.id = v.credential_id WHERE c.kind = 'totp_seed';
