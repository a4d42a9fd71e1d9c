-- Up Migration

-- The first statement of a group-committed store batch (vault/store-batch.ts). For each call, in
-- order: lock the caller's credential of that name, or create it; refuse the call if the credential
-- is deleted, at another version than the one expected, or of another kind (nothing is written for a
-- refused call); else make the next version current. Row i answers the i-th call (1-based):
--   outcome 'created' or 'ok'  the call goes on with new_version
--   'deleted', 'version_conflict', 'kind_mismatch', 'absent' (expectedVersion > 0 for no credential)
--                              the call is refused; found_version and found_kind say what was there
-- Outcome NULL (a name neither found nor created twice over): the caller rolls back and stores alone.
-- These are the statements Vault.store issues one by one when it stores alone (vault.ts), in one
-- round trip. A name appears at most once per batch, so each call sees only committed versions.
-- The row is locked before its next version is counted, in a statement of its own: one UPDATE that
-- waited for a concurrent store's commit rechecks the row but not its subquery, whose max(version)
-- still misses the version that store committed (a duplicate key; the test of two processes storing
-- the same names found it).
CREATE FUNCTION vault_store_prepare(callers uuid[], names text[], kinds text[], expected int[], new_ids uuid[], now_at timestamptz)
RETURNS TABLE (i int, cred_id uuid, outcome text, new_version int, found_version int, found_kind text)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
  rec record;
BEGIN
  FOR n IN 1 .. coalesce(array_length(callers, 1), 0) LOOP
    i := n; cred_id := NULL; outcome := NULL; new_version := NULL; found_version := NULL; found_kind := NULL;
    -- A concurrent first store of the same name wins the unique index; then its row is locked instead.
    FOR attempt IN 1 .. 2 LOOP
      SELECT c.id, c.kind, c.current_version, c.deleted_at IS NOT NULL AS deleted INTO rec
        FROM credentials c
       WHERE c.identity_id = callers[n] AND c.name = names[n] AND c.destroyed_at IS NULL
         FOR NO KEY UPDATE;
      IF FOUND THEN
        cred_id := rec.id; found_version := rec.current_version; found_kind := rec.kind;
        IF rec.deleted THEN
          outcome := 'deleted';
        ELSIF expected[n] IS NOT NULL AND expected[n] <> rec.current_version THEN
          outcome := 'version_conflict';
        ELSIF rec.kind <> kinds[n] THEN
          outcome := 'kind_mismatch';
        ELSE
          UPDATE credentials c
             SET previous_version = c.current_version, updated_at = now_at,
                 current_version = (SELECT coalesce(max(v.version), 0) + 1 FROM secret_versions v WHERE v.credential_id = rec.id)
           WHERE c.id = rec.id
          RETURNING c.current_version INTO new_version;
          outcome := 'ok';
        END IF;
        EXIT;
      END IF;
      IF expected[n] IS NOT NULL AND expected[n] <> 0 THEN
        outcome := 'absent';
        EXIT;
      END IF;
      INSERT INTO credentials (id, identity_id, name, kind, current_version, created_at, updated_at)
      VALUES (new_ids[n], callers[n], names[n], kinds[n], 1, now_at, now_at)
      ON CONFLICT (identity_id, name) WHERE destroyed_at IS NULL DO NOTHING;
      IF FOUND THEN
        cred_id := new_ids[n]; new_version := 1; outcome := 'created';
        EXIT;
      END IF;
    END LOOP;
    RETURN NEXT;
  END LOOP;
END
$$;
