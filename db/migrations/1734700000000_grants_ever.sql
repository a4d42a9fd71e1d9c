-- Up Migration

-- mail.send refuses a value its sender was ever granted (a revoked grant does not make the grantee
-- forget a value it read, and the value may still work at its provider): the grants of one grantee,
-- revoked ones too, are looked up by this index (grants_grantee holds the active ones only).
CREATE INDEX grants_grantee_all ON grants (grantee_id, credential_id);
