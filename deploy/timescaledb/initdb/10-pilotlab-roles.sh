#!/bin/sh
# pilotlab's database roles (docs/operations.md, "Database roles and privileges").
#
# Runs once, when the timescaledb container initialises an empty data volume
# (/docker-entrypoint-initdb.d), as the superuser POSTGRES_USER over the container's socket:
#   * storage/roles.sql (mounted at /pilotlab/roles.sql) creates pilotlab_owner (owns the
#     database; `migrate` runs as it), pilotlab_writer (the sink) and grafana_reader (Grafana),
#     none of them a superuser, with the passwords PILOTLAB_DB_OWNER_PASSWORD,
#     PILOTLAB_DB_WRITER_PASSWORD and GRAFANA_DB_PASSWORD;
#   * pg_hba.conf: passwords (scram-sha-256) for everyone, and the superuser only from inside
#     the container (`docker-compose exec timescaledb psql -U postgres pilotlab`).
#
# A volume initialised before these roles existed: run it once by hand, as that volume's
# superuser (it was `pilotlab`), then restart the pipeline's services:
#   docker-compose up -d timescaledb
#   docker-compose exec -e POSTGRES_USER=pilotlab timescaledb sh /docker-entrypoint-initdb.d/10-pilotlab-roles.sh
# Idempotent: rerun it to change the passwords from the environment.
set -eu

: "${POSTGRES_USER:?}" "${POSTGRES_DB:?}" "${PGDATA:?}"
: "${PILOTLAB_DB_OWNER_PASSWORD:?set PILOTLAB_DB_OWNER_PASSWORD}"
: "${PILOTLAB_DB_WRITER_PASSWORD:?set PILOTLAB_DB_WRITER_PASSWORD}"
: "${GRAFANA_DB_PASSWORD:?set GRAFANA_DB_PASSWORD}"
ROLES_SQL="${PILOTLAB_ROLES_SQL:-/pilotlab/roles.sql}"

# the passwords travel through the environment (\getenv), not the command line
psql -v ON_ERROR_STOP=1 --no-psqlrc --quiet --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     -v roles_sql="$ROLES_SQL" <<'SQL'
\getenv owner_password PILOTLAB_DB_OWNER_PASSWORD
\getenv writer_password PILOTLAB_DB_WRITER_PASSWORD
\getenv reader_password GRAFANA_DB_PASSWORD
BEGIN;
SELECT set_config('pilotlab.owner_password', :'owner_password', true),
       set_config('pilotlab.writer_password', :'writer_password', true),
       set_config('pilotlab.reader_password', :'reader_password', true) \g /dev/null
\i :roles_sql
COMMIT;
SQL

# Who may connect how: the superuser over the socket only; every other role with its password.
hba="$PGDATA/pg_hba.conf"
cat > "$hba.pilotlab" <<HBA
# written by deploy/timescaledb/initdb/10-pilotlab-roles.sh (docs/operations.md)
local   all   "$POSTGRES_USER"   trust
local   all   all                scram-sha-256
host    all   "$POSTGRES_USER"   all   reject
host    all   all                all   scram-sha-256
HBA
chmod 600 "$hba.pilotlab"
mv "$hba.pilotlab" "$hba"
psql -v ON_ERROR_STOP=1 --no-psqlrc --quiet --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     -c "SELECT pg_reload_conf()" > /dev/null
