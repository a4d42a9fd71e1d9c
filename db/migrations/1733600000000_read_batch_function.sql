-- Up Migration

-- The read statement of a group-committed read batch (vault/read-batch.ts), as a function so that it
-- runs on one cached generic plan. As a prepared statement PostgreSQL planned it afresh for every
-- batch: with the arrays' lengths known, a custom plan always looked cheaper than the generic one
-- (whose unnest is estimated at ten rows), so the generic plan was never chosen, and planning this
-- UNION ALL of joins cost ~300 µs of the database's CPU per batch, more than running it (a batch of 6:
-- ~465 µs as a prepared statement, ~155 µs as this function). A plpgsql function keeps its
-- statement's plan for the session, and `SET plan_cache_mode` makes that plan the generic one.
--
-- Own credentials by name or id; credentials granted to the caller by id only (names are per owner).
-- Each call's lookup is a LATERAL subquery, so it can only be index lookups for that call (a join
-- over the whole batch let a generic plan hash whole tables once they held a thousand rows), and
-- `destroyed_at IS NULL` lets the name lookup use the unique (identity_id, name) index. Row i of the
-- result answers the i-th call (1-based); a call with no row found nothing it may read.
CREATE FUNCTION vault_read_batch(callers uuid[], names text[], ref_ids uuid[], versions int[])
RETURNS TABLE (
  i bigint, id uuid, identity_id uuid, name text, kind text,
  current_version int, previous_version int, pending_version int,
  version int, data_key_id uuid, sealed bytea, created_at timestamptz
)
LANGUAGE plpgsql STABLE
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
BEGIN
  RETURN QUERY
  SELECT q.i, f.* FROM unnest(callers, names, ref_ids, versions) WITH ORDINALITY AS q(caller, name, ref_id, version, i)
  CROSS JOIN LATERAL (
    SELECT c.id, c.identity_id, c.name, c.kind, c.current_version, c.previous_version, c.pending_version,
           v.version, v.data_key_id, v.sealed, v.created_at
      FROM credentials c JOIN secret_versions v ON v.credential_id = c.id AND v.version = coalesce(q.version, c.current_version)
     WHERE c.identity_id = q.caller AND c.name = q.name AND c.destroyed_at IS NULL AND c.deleted_at IS NULL
    UNION ALL
    SELECT c.id, c.identity_id, c.name, c.kind, c.current_version, c.previous_version, c.pending_version,
           v.version, v.data_key_id, v.sealed, v.created_at
      FROM credentials c JOIN secret_versions v ON v.credential_id = c.id AND v.version = coalesce(q.version, c.current_version)
     WHERE c.id = q.ref_id AND c.deleted_at IS NULL AND (c.identity_id = q.caller OR EXISTS (
       SELECT 1 FROM grants g WHERE g.credential_id = c.id AND g.grantee_id = q.caller AND g.revoked_at IS NULL))
  ) f;
END
$$;
