#!/bin/sh
# Runs once, when the PostgreSQL data directory is empty (docker-entrypoint-initdb.d): one role and
# database for Mailgent, and a role for Temporal that may create its own two databases. Passwords
# come from deploy/postgres.env: psql reads them from its environment (\getenv, psql 15 and later),
# never from its command line (which `ps` shows), and quotes them as literals, never spliced into SQL text.
set -eu
: "${MAILGENT_DB_PASSWORD:?}" "${TEMPORAL_DB_PASSWORD:?}"
export MAILGENT_DB_PASSWORD TEMPORAL_DB_PASSWORD
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres <<'SQL'
\getenv mailgent_password MAILGENT_DB_PASSWORD
\getenv temporal_password TEMPORAL_DB_PASSWORD
CREATE ROLE mailgent LOGIN PASSWORD :'mailgent_password';
CREATE DATABASE mailgent OWNER mailgent;
CREATE ROLE temporal LOGIN CREATEDB PASSWORD :'temporal_password';
SQL
