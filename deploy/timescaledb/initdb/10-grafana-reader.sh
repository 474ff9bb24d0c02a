#!/bin/sh
# Runs once, when the timescaledb container initialises an empty data volume
# (/docker-entrypoint-initdb.d). Creates the read-only login Grafana uses.
# The password comes from GRAFANA_DB_PASSWORD (docker-compose.yml, default `grafana_reader`).
# To change it on an existing volume: ALTER ROLE grafana_reader PASSWORD '...';
set -eu

psql -v ON_ERROR_STOP=1 \
     --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     -v reader_password="${GRAFANA_DB_PASSWORD:-grafana_reader}" <<'SQL'
SELECT format('CREATE ROLE grafana_reader LOGIN PASSWORD %L', :'reader_password')
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'grafana_reader')
\gexec
-- Read everything, write nothing: pg_read_all_data (PostgreSQL 14+) also covers tables
-- that `pilotlab db migrate` creates later; read-only transactions are a second fence.
GRANT CONNECT ON DATABASE :"DBNAME" TO grafana_reader;
GRANT pg_read_all_data TO grafana_reader;
ALTER ROLE grafana_reader SET default_transaction_read_only = on;
ALTER ROLE grafana_reader SET statement_timeout = '30s';
SQL
