-- Up Migration

-- The chain trigger reads the newest row's hash once it holds the chain lock. Under REPEATABLE READ
-- or SERIALIZABLE that read sees the transaction's snapshot, taken before the lock was granted, and
-- misses rows other sessions committed meanwhile: the row was chained to an old head, the chain
-- forked, and `mailgent audit verify` reported a broken link on a history nobody had touched. (An
-- operator's `default_transaction_isolation = 'repeatable read'`, a common hardening step, did it.)
-- A transaction's first audit row is now refused under any isolation but READ COMMITTED; Mailgent's
-- own connections ask for READ COMMITTED (db/pool.ts), whatever the database's default.
CREATE OR REPLACE FUNCTION audit_log_chain() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
  head text := current_setting('mailgent.audit_chain_head', true);
  last_hash bytea;
BEGIN
  IF head IS NULL OR head = '' THEN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
      RAISE EXCEPTION 'audit rows are appended in READ COMMITTED transactions only (this one is %): its snapshot would hide the chain''s head', current_setting('transaction_isolation')
        USING ERRCODE = 'feature_not_supported';
    END IF;
    PERFORM pg_advisory_xact_lock(4631800001);
    SELECT hash INTO last_hash FROM audit_log ORDER BY seq DESC LIMIT 1;
  ELSE
    last_hash := decode(head, 'hex');
  END IF;
  NEW.seq := nextval('audit_log_seq');
  NEW.at := clock_timestamp();
  NEW.prev_hash := coalesce(last_hash, '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea);
  NEW.hash := sha256(NEW.prev_hash || audit_payload(NEW));
  -- An assignment, not PERFORM: a simple expression, not a query.
  head := set_config('mailgent.audit_chain_head', encode(NEW.hash, 'hex'), true);
  RETURN NEW;
END
$$;
