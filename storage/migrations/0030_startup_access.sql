-- Per-startup isolation enforced by the database (docs/access.md, storage/access.py).
--
-- One NOLOGIN group role, pilotlab_startups, holds SELECT on what a startup may see; each
-- startup has its own role startup_<slug> (storage.access.role_name), a member of the group,
-- mapped to its startup in startup_roles. Row-level security filters every row by
-- pilotlab_current_startup(): the startup of current_user, NULL for any other role. The lab's
-- roles are not filtered: a permissive policy per table gives pilotlab_writer everything it
-- writes and grafana_reader everything it reads; the owner owns the tables (RLS does not apply
-- to a table's owner: no FORCE ROW LEVEL SECURITY).
--
-- This file: what holds in both database modes (tables that are never hypertables). 0031 adds
-- the time-series tables and rollups per mode: RLS cannot be enabled on TimescaleDB hypertables
-- that use compression, and chunks and continuous aggregates carry no policy.
--
-- Roles are created by storage/roles.sql (a superuser): pilotlab_owner may not create roles.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pilotlab_startups') THEN
        IF NOT (SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user) THEN
            RAISE EXCEPTION 'role pilotlab_startups does not exist and % may not create it', current_user
                USING HINT = 'run storage/roles.sql as a superuser first (`pilotlab stack up` does; docs/access.md)';
        END IF;
        CREATE ROLE pilotlab_startups NOLOGIN NOINHERIT;
    END IF;
END
$$;

-- Which role acts for which startup (experiments.startup). Written by `pilotlab access grant`
-- (the owner) only; a startup role reads its own row.
CREATE TABLE startup_roles (
    startup    text PRIMARY KEY,
    role       text NOT NULL UNIQUE CHECK (role ~ '^startup_[a-z0-9_]{1,55}$'),
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Access tokens: the lab's (startup NULL) and the startups'. Only a SHA-256 of the token is
-- stored (tokens are 256-bit random secrets: a slow hash adds nothing; docs/access.md).
-- sql_login: this grant holds the startup role's current SQL password (one per startup).
CREATE TABLE access_tokens (
    token_id   text PRIMARY KEY CHECK (token_id ~ '^[0-9a-f]{16}$'),
    startup    text REFERENCES startup_roles (startup),
    token_hash bytea NOT NULL CHECK (length(token_hash) = 32),
    label      text NOT NULL DEFAULT '',
    sql_login  boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz,
    CHECK (NOT sql_login OR startup IS NOT NULL)
);
CREATE UNIQUE INDEX access_tokens_one_sql_login ON access_tokens (startup) WHERE sql_login AND revoked_at IS NULL;

-- The startup the current role acts for; NULL for every role that is not a startup's.
-- current_user, not session_user: the portal connects as grafana_reader and runs a startup's
-- requests after SET LOCAL ROLE startup_<slug>. SECURITY INVOKER (as every function here):
-- a startup role reads its own row of startup_roles through the policy below.
CREATE FUNCTION pilotlab_current_startup() RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT s.startup FROM startup_roles s WHERE s.role = current_user::text
$$;

ALTER TABLE startup_roles ENABLE ROW LEVEL SECURITY;
CREATE POLICY lab_read ON startup_roles FOR SELECT TO grafana_reader USING (true);
CREATE POLICY startup_own ON startup_roles FOR SELECT TO pilotlab_startups
    USING (role = current_user::text);

-- experiments: the startup's own
ALTER TABLE experiments ENABLE ROW LEVEL SECURITY;
CREATE POLICY lab_write ON experiments TO pilotlab_writer USING (true) WITH CHECK (true);
CREATE POLICY lab_read ON experiments FOR SELECT TO grafana_reader USING (true);
CREATE POLICY startup_own ON experiments FOR SELECT TO pilotlab_startups
    USING (startup = pilotlab_current_startup());

-- Rows keyed by experiment: those of the startup's experiments (a rejection for an experiment
-- nobody registered, or with no experiment at all, is the lab's alone).
DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['devices', 'rejections', 'device_status', 'alerts'] LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('CREATE POLICY lab_write ON %I TO pilotlab_writer USING (true) WITH CHECK (true)', t);
        EXECUTE format('CREATE POLICY lab_read ON %I FOR SELECT TO grafana_reader USING (true)', t);
        EXECUTE format('CREATE POLICY startup_own ON %I FOR SELECT TO pilotlab_startups'
                       ' USING (experiment_id IN (SELECT e.experiment_id FROM experiments e'
                       '                           WHERE e.startup = pilotlab_current_startup()))', t);
    END LOOP;
END
$$;

-- deliveries: those of the startup's alerts
ALTER TABLE alert_deliveries ENABLE ROW LEVEL SECURITY;
CREATE POLICY lab_write ON alert_deliveries TO pilotlab_writer USING (true) WITH CHECK (true);
CREATE POLICY lab_read ON alert_deliveries FOR SELECT TO grafana_reader USING (true);
CREATE POLICY startup_own ON alert_deliveries FOR SELECT TO pilotlab_startups
    USING (alert_id IN (SELECT a.alert_id FROM alerts a
                         WHERE a.experiment_id IN (SELECT e.experiment_id FROM experiments e
                                                    WHERE e.startup = pilotlab_current_startup())));

-- The alerts engine's own state (alert_state, alert_offsets) is the lab's: RLS on, no startup
-- policy and no grant, so a future grant still shows nothing.
ALTER TABLE alert_state ENABLE ROW LEVEL SECURITY;
CREATE POLICY lab_write ON alert_state TO pilotlab_writer USING (true) WITH CHECK (true);
CREATE POLICY lab_read ON alert_state FOR SELECT TO grafana_reader USING (true);

-- What a startup role may read: SELECT on the tables above, the query functions (EXECUTE is
-- PUBLIC's; they are SECURITY INVOKER, so RLS applies inside them). Nothing else: no write, no
-- TEMP, no access_tokens, no schema_migrations, no alert engine state. New tables get no grant
-- to pilotlab_startups by default (tests/integration/test_access_isolation.py checks that every
-- table holding a startup's rows has a policy).
GRANT SELECT ON experiments, devices, rejections, device_status, alerts, alert_deliveries, startup_roles
    TO pilotlab_startups;

-- CONNECT (roles.sql grants it too; stated here for a database roles.sql ran on before)
DO $$
BEGIN
    IF NOT (SELECT datistemplate FROM pg_database WHERE datname = current_database()) THEN
        EXECUTE format('GRANT CONNECT ON DATABASE %I TO pilotlab_startups', current_database());
    END IF;
END
$$;
