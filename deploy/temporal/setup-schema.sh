#!/bin/sh
# Temporal's persistence and visibility databases on PostgreSQL (temporal-sql-tool reads SQL_PLUGIN,
# SQL_HOST, SQL_PORT, SQL_USER and SQL_PASSWORD from the environment). Idempotent: creating what
# exists is skipped, and update-schema applies only the versions a database does not have yet.
set -eu
schema=/etc/temporal/schema/postgresql/v12
for db in temporal temporal_visibility; do
  dir=temporal
  [ "$db" = temporal_visibility ] && dir=visibility
  temporal-sql-tool --db "$db" create 2>/dev/null || echo "database $db exists"
  temporal-sql-tool --db "$db" setup-schema -v 0.0 2>/dev/null || echo "schema of $db is set up"
  temporal-sql-tool --db "$db" update-schema -d "$schema/$dir/versioned"
done
echo 'Temporal schema is up to date'
