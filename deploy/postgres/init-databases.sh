#!/bin/sh
# Runs once, when the PostgreSQL data directory is empty (docker-entrypoint-initdb.d): one role and
# database for Mailgent, and a role for Temporal that may create its own two databases. Passwords
# come from deploy/postgres.env and are passed to psql as variables, never spliced into SQL text.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
  -v mailgent_password="$MAILGENT_DB_PASSWORD" -v temporal_password="$TEMPORAL_DB_PASSWORD" <<'SQL'
CREATE ROLE mailgent LOGIN PASSWORD :'mailgent_password';
CREATE DATABASE mailgent OWNER mailgent;
CREATE ROLE temporal LOGIN CREATEDB PASSWORD :'temporal_password';
SQL
