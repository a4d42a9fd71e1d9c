#!/bin/sh
# Writes deploy/postgres.env, deploy/temporal.env and deploy/mailgent.env from their examples, with
# fresh random passwords, master key and admin token that agree with each other. Never overwrites an
# existing file (the master key in it is what decrypts your vault). Needs openssl.
# Usage: sh deploy/make-env.sh [directory]   (default: the directory of this script)
set -eu
dir=${1:-$(dirname "$0")}
umask 077
for name in postgres temporal mailgent; do
  if [ -e "$dir/$name.env" ]; then
    echo "$dir/$name.env exists; remove all three deploy/*.env files to generate new ones" >&2
    exit 1
  fi
done
example=$(dirname "$0")
pw() { openssl rand -hex 24; }
postgres_pw=$(pw)
mailgent_pw=$(pw)
temporal_pw=$(pw)
master_key=$(openssl rand -base64 32)
admin_token=$(openssl rand -hex 32)

sed -e "s|^POSTGRES_PASSWORD=.*|POSTGRES_PASSWORD=$postgres_pw|" \
    -e "s|^MAILGENT_DB_PASSWORD=.*|MAILGENT_DB_PASSWORD=$mailgent_pw|" \
    -e "s|^TEMPORAL_DB_PASSWORD=.*|TEMPORAL_DB_PASSWORD=$temporal_pw|" \
    "$example/postgres.env.example" > "$dir/postgres.env"
sed -e "s|^POSTGRES_PWD=.*|POSTGRES_PWD=$temporal_pw|" \
    -e "s|^SQL_PASSWORD=.*|SQL_PASSWORD=$temporal_pw|" \
    "$example/temporal.env.example" > "$dir/temporal.env"
sed -e "s|^DATABASE_URL=.*|DATABASE_URL=postgres://mailgent:$mailgent_pw@postgres:5432/mailgent|" \
    -e "s|^VAULT_MASTER_KEY=.*|VAULT_MASTER_KEY=$master_key|" \
    -e "s|^ADMIN_TOKEN=.*|ADMIN_TOKEN=$admin_token|" \
    "$example/mailgent.env.example" > "$dir/mailgent.env"
echo "wrote $dir/postgres.env, $dir/temporal.env and $dir/mailgent.env (mode 0600)"
echo "the admin token is ADMIN_TOKEN in $dir/mailgent.env"
