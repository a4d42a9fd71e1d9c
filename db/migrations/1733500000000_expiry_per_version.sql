-- Up Migration

-- An expiry belongs to a value: the provider (or whoever stored it) said when that value stops
-- working. credentials.expires_at stays the expiry of the current version, the one the API shows and
-- next_rotation_of() and the reminders read. When another version becomes current (a rotation's
-- promote, a rollback, a new vault.store) the outgoing version keeps its expiry on its own row and
-- the incoming one brings its own: the one it had before (a rollback), the one its provider gave (a
-- pending version), else none. Before this, a credential rotated because it was about to expire kept
-- the old value's expiry, so it stayed due and every daily sweep rotated it again.
-- An UPDATE that sets a new version and a different expiry together keeps the expiry it sets.
-- Credentials rotated before this migration still carry their old value's expiry: their next
-- rotation (the next sweep, if they are due) leaves it behind.
ALTER TABLE secret_versions ADD COLUMN expires_at timestamptz;

CREATE FUNCTION credentials_expiry_follows_version() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.current_version IS DISTINCT FROM OLD.current_version THEN
    UPDATE secret_versions SET expires_at = OLD.expires_at WHERE credential_id = OLD.id AND version = OLD.current_version;
    IF NEW.expires_at IS NOT DISTINCT FROM OLD.expires_at THEN
      NEW.expires_at := (SELECT v.expires_at FROM secret_versions v WHERE v.credential_id = NEW.id AND v.version = NEW.current_version);
    END IF;
  END IF;
  RETURN NEW;
END
$$;

-- BEFORE triggers fire in name order: this one runs before credentials_next_rotation, so the due date
-- is computed from the incoming version's expiry.
CREATE TRIGGER credentials_expiry_follows_version BEFORE UPDATE OF current_version ON credentials
  FOR EACH ROW EXECUTE FUNCTION credentials_expiry_follows_version();
