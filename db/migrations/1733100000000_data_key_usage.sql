-- Up Migration

-- How many AES-GCM encryptions each data key has made. With random 96-bit nonces a key must stay
-- well below 2^32 encryptions (NIST SP 800-38D 8.3); the vault retires a key and makes a new one
-- when its count passes DATA_KEY_MAX_ENCRYPTIONS. Existing keys start from the versions they sealed.
ALTER TABLE data_keys ADD COLUMN encryptions bigint NOT NULL DEFAULT 0 CHECK (encryptions >= 0);

UPDATE data_keys k SET encryptions = (SELECT count(*) FROM secret_versions v WHERE v.data_key_id = k.id);
