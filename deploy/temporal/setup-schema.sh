#!/bin/sh
# Temporal's persistence and visibility databases on PostgreSQL (temporal-sql-tool reads SQL_PLUGIN,
# SQL_HOST, SQL_PORT, SQL_USER and SQL_PASSWORD from the environment). Idempotent: creating what
# exists is skipped, and update-schema applies only the versions a database does not have yet.
set -eu
schema=/etc/temporal/schema/postgresql/v12
for db in temporal temporal_visibility; do
  dir=temporal
  [ "$db" = temporal_visibility ] && dir=visibility
  # A second run finds both done; the tool's own words are kept, so a real failure (a refused
  # connection, a wrong password) shows here and not only as a puzzling update-schema error below.
  out=$(temporal-sql-tool --db "$db" create 2>&1) || echo "database $db not created (it exists?): $out"
  out=$(temporal-sql-tool --db "$db" setup-schema -v 0.0 2>&1) || echo "schema of $db not set up (it is?): $out"
  temporal-sql-tool --db "$db" update-schema -d "$schema/$dir/versioned"
done
echo 'Temporal schema is up to date'
