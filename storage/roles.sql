-- pilotlab's database roles: run as a SUPERUSER, connected to the application's database.
-- Idempotent; run on every `pilotlab stack up` (storage/roles.py) and by docker-compose's
-- first start (deploy/timescaledb/initdb/10-pilotlab-roles.sh). See docs/operations.md,
-- "Database roles and privileges".
--
--   pilotlab_owner   owns the database and every object of the schema; runs the migrations
--                    (PILOTLAB_DATABASE_OWNER_URL). Not a superuser, cannot create roles.
--   pilotlab_writer  the sink (PILOTLAB_DATABASE_URL): writes its tables, as granted by the
--                    migrations (0022); TEMP for its COPY staging table; nothing else.
--   grafana_reader   Grafana, `pilotlab report`, `pilotlab plan` (PILOTLAB_DATABASE_READER_URL):
--                    SELECT only.
--
-- Passwords come from the custom settings pilotlab.owner_password, pilotlab.writer_password and
-- pilotlab.reader_password (set_config before running this file); an unset or empty one leaves
-- that role's password as it is. Roles are created LOGIN; without a password they cannot log in
-- over a scram-sha-256 connection.
--
-- What only a superuser can pin, and what the roles therefore cannot lift themselves:
-- no SUPERUSER / CREATEDB / CREATEROLE / REPLICATION / BYPASSRLS, no role memberships, the
-- CONNECTION LIMITs, grafana_reader's temp_file_limit (a superuser-only setting), and no
-- EXECUTE on the functions that create large objects. statement_timeout and
-- default_transaction_read_only are set here too, but they are only defaults: PostgreSQL lets
-- every role SET them in its session and ALTER ROLE itself SET them (see docs/operations.md).

DO $$
BEGIN
    IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        RAISE EXCEPTION 'storage/roles.sql must run as a superuser (connected as %)', current_user;
    END IF;
END
$$;

-- the three roles, with the attributes only a superuser may change
DO $$
DECLARE
    r record;
    pw text;
    m record;
BEGIN
    FOR r IN SELECT * FROM (VALUES ('pilotlab_owner', 'pilotlab.owner_password', -1),
                                   ('pilotlab_writer', 'pilotlab.writer_password', 20),
                                   ('grafana_reader', 'pilotlab.reader_password', 20))
                          AS v (name, setting, conn_limit)
    LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r.name) THEN
            EXECUTE format('CREATE ROLE %I', r.name);
        END IF;
        EXECUTE format('ALTER ROLE %I LOGIN INHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION'
                       ' NOBYPASSRLS CONNECTION LIMIT %s', r.name, r.conn_limit);
        pw := current_setting(r.setting, true);
        IF coalesce(pw, '') <> '' THEN
            EXECUTE format('ALTER ROLE %I PASSWORD %L', r.name, pw);
        END IF;
        -- members of nothing (docker-compose used to grant grafana_reader pg_read_all_data),
        -- but the startups' roles for grafana_reader (the portal's SET LOCAL ROLE; see below)
        FOR m IN SELECT a.roleid::regrole AS granted FROM pg_auth_members a
                  WHERE a.member = (SELECT oid FROM pg_roles WHERE rolname = r.name)
                    AND NOT (r.name = 'grafana_reader' AND a.roleid IN (
                             SELECT s.member FROM pg_auth_members s JOIN pg_roles g ON g.oid = s.roleid
                              WHERE g.rolname = 'pilotlab_startups'))
        LOOP
            EXECUTE format('REVOKE %s FROM %I', m.granted, r.name);
        END LOOP;
    END LOOP;
END
$$;

-- grafana_reader's session defaults. temp_file_limit can only be set or reset by a superuser:
-- a real bound on what one heavy query may spill to disk. The other two are defaults the role
-- can change itself; its read-only guarantee is that it holds no write privilege at all.
ALTER ROLE grafana_reader SET temp_file_limit = '1GB';
ALTER ROLE grafana_reader SET statement_timeout = '30s';
ALTER ROLE grafana_reader SET default_transaction_read_only = on;

-- Objects a superuser created in the schema before these roles existed (databases migrated as
-- the former superuser `pilotlab`) become the owner's. Extension members and objects that
-- follow their table (indexes, owned sequences) are left to PostgreSQL.
DO $$
DECLARE
    r record;
    cagg regclass[] := '{}';
BEGIN
    IF to_regclass('_timescaledb_catalog.continuous_agg') IS NOT NULL THEN
        EXECUTE 'SELECT coalesce(array_agg(format(''%I.%I'', user_view_schema, user_view_name)::regclass), ''{}'')'
                ' FROM _timescaledb_catalog.continuous_agg' INTO cagg;
    END IF;
    FOR r IN
        SELECT c.oid::regclass AS obj,
               CASE WHEN c.oid = ANY (cagg) OR c.relkind = 'm' THEN 'MATERIALIZED VIEW'
                    WHEN c.relkind = 'v' THEN 'VIEW'
                    WHEN c.relkind = 'S' THEN 'SEQUENCE'
                    ELSE 'TABLE' END AS kind
          FROM pg_class c
          JOIN pg_roles o ON o.oid = c.relowner
         WHERE c.relnamespace = 'public'::regnamespace
           AND o.rolsuper
           AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
           AND NOT EXISTS (SELECT 1 FROM pg_depend d
                            WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                              AND d.deptype IN ('e', 'a', 'i'))
    LOOP
        EXECUTE format('ALTER %s %s OWNER TO pilotlab_owner', r.kind, r.obj);
    END LOOP;
    FOR r IN
        SELECT p.oid::regprocedure AS obj, CASE p.prokind WHEN 'p' THEN 'PROCEDURE' ELSE 'FUNCTION' END AS kind
          FROM pg_proc p
          JOIN pg_roles o ON o.oid = p.proowner
         WHERE p.pronamespace = 'public'::regnamespace
           AND o.rolsuper
           AND p.prokind IN ('f', 'p')
           AND NOT EXISTS (SELECT 1 FROM pg_depend d
                            WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')
    LOOP
        EXECUTE format('ALTER %s %s OWNER TO pilotlab_owner', r.kind, r.obj);
    END LOOP;
    -- TimescaleDB's policies on those tables run as their job's owner (internal jobs stay)
    IF to_regclass('_timescaledb_config.bgw_job') IS NOT NULL THEN
        -- (owner is a regrole in recent TimescaleDB, a name in older ones: compare as text)
        EXECUTE 'UPDATE _timescaledb_config.bgw_job SET owner = ''pilotlab_owner'''
                ' WHERE hypertable_id IS NOT NULL'
                '   AND owner::text IN (SELECT rolname::text FROM pg_roles WHERE rolsuper)';
    END IF;
END
$$;

-- The database: the owner's. Nobody else connects unless granted; only the writer may create
-- temporary tables (the sink's COPY staging table, dropped at commit). The maintenance
-- databases are closed to everyone but superusers.
-- (A template database is left alone: PGlite, the TimescaleDB test target, runs its one session
-- in template1 and cannot update that row; pilotlab never runs in a template.)
DO $$
DECLARE
    db text;
BEGIN
    FOR db IN SELECT datname FROM pg_database WHERE datname IN ('postgres', 'template1')
                                                AND datname <> current_database()
    LOOP
        EXECUTE format('REVOKE ALL ON DATABASE %I FROM PUBLIC', db);
    END LOOP;
    IF NOT (SELECT datistemplate FROM pg_database WHERE datname = current_database()) THEN
        EXECUTE format('ALTER DATABASE %I OWNER TO pilotlab_owner', current_database());
        EXECUTE format('REVOKE ALL ON DATABASE %I FROM PUBLIC', current_database());
        EXECUTE format('GRANT CONNECT ON DATABASE %I TO pilotlab_writer, grafana_reader', current_database());
        EXECUTE format('REVOKE TEMPORARY ON DATABASE %I FROM grafana_reader', current_database());
        EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO pilotlab_writer', current_database());
    END IF;
END
$$;

-- No CREATE on the schema for anyone but its owner (PostgreSQL 15's default; older clusters
-- granted it to PUBLIC).
REVOKE CREATE ON SCHEMA public FROM PUBLIC;

-- Large objects are the one thing any role may create without a privilege on the database
-- (even in a read-only transaction): only superusers keep the functions that create them.
REVOKE EXECUTE ON FUNCTION lo_creat(integer), lo_create(oid), lo_from_bytea(oid, bytea),
                           lo_import(text), lo_import(text, oid)
    FROM PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- Per-startup access (docs/access.md, storage/access.py). The group role every startup's own
-- role belongs to, and the few things that need CREATEROLE, which no pilotlab role holds:
-- SECURITY DEFINER functions owned by this superuser in their own schema (not public: the block
-- above would hand them to the owner), executable by pilotlab_owner alone. They create and
-- change roles named startup_<slug> that are members of pilotlab_startups and nothing else.
--
--   pilotlab_startups   NOLOGIN group: SELECT on the startup-visible tables (migration 0030),
--                       every row filtered by row-level security to the member's startup.
--   startup_<slug>      one per startup (storage.access.role_name): LOGIN only while a SQL grant
--                       is active (a SCRAM verifier computed by pilotlab, never a plaintext
--                       password), read-only defaults, 5 connections, no TEMP. grafana_reader
--                       is made a member of it so that the portal, connected as grafana_reader,
--                       can SET LOCAL ROLE to it (a startup's rows are a subset of the lab's).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pilotlab_startups') THEN
        CREATE ROLE pilotlab_startups;
    END IF;
    ALTER ROLE pilotlab_startups NOLOGIN NOINHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
END
$$;

CREATE SCHEMA IF NOT EXISTS pilotlab_admin;
DO $$
BEGIN
    -- a schema made by an earlier run belongs to whoever ran it: a superuser, as here
    IF (SELECT NOT r.rolsuper FROM pg_namespace n JOIN pg_roles r ON r.oid = n.nspowner
         WHERE n.nspname = 'pilotlab_admin') THEN
        RAISE EXCEPTION 'schema pilotlab_admin is not owned by a superuser';
    END IF;
END
$$;
REVOKE ALL ON SCHEMA pilotlab_admin FROM PUBLIC;
GRANT USAGE ON SCHEMA pilotlab_admin TO pilotlab_owner;

-- p_role must be a startup role: the name pilotlab gives one and, when it exists, a member of
-- pilotlab_startups with no attribute beyond LOGIN (so these functions never touch another role).
CREATE OR REPLACE FUNCTION pilotlab_admin.check_startup_role(p_role text) RETURNS boolean
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r record;
BEGIN
    IF p_role IS NULL OR p_role !~ '^startup_[a-z0-9_]{1,55}$' THEN
        RAISE EXCEPTION 'not a startup role name: %', p_role USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO r FROM pg_roles WHERE rolname = p_role;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF r.rolsuper OR r.rolcreaterole OR r.rolcreatedb OR r.rolreplication OR r.rolbypassrls
       OR NOT pg_has_role(r.oid, 'pilotlab_startups', 'MEMBER')
       OR EXISTS (SELECT 1 FROM pg_auth_members m WHERE m.member = r.oid
                   AND m.roleid <> 'pilotlab_startups'::regrole) THEN
        RAISE EXCEPTION 'role % exists and is not a pilotlab startup role', p_role
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN true;
END
$$;

-- Create the startup's role (NOLOGIN until a SQL grant) when missing; idempotent.
CREATE OR REPLACE FUNCTION pilotlab_admin.ensure_startup_role(p_role text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT pilotlab_admin.check_startup_role(p_role) THEN
        EXECUTE format('CREATE ROLE %I NOLOGIN INHERIT IN ROLE pilotlab_startups', p_role);
    END IF;
    EXECUTE format('ALTER ROLE %I NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS'
                   ' CONNECTION LIMIT 5', p_role);
    EXECUTE format('ALTER ROLE %I SET default_transaction_read_only = on', p_role);
    EXECUTE format('ALTER ROLE %I SET statement_timeout = %L', p_role, '30s');
    EXECUTE format('ALTER ROLE %I SET temp_file_limit = %L', p_role, '256MB');
    -- its time series in TimescaleDB mode: the per-startup views of migration 0044 first
    EXECUTE format('ALTER ROLE %I SET search_path = pilotlab_startup, public', p_role);
    -- the portal (connected as grafana_reader) takes the role with SET LOCAL ROLE
    EXECUTE format('GRANT %I TO grafana_reader', p_role);
END
$$;

-- Let the role log in with this SCRAM-SHA-256 verifier, or (NULL) take its login away and end
-- its sessions. Plaintext passwords are refused: they would reach the server's logs.
CREATE OR REPLACE FUNCTION pilotlab_admin.set_startup_login(p_role text, p_verifier text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT pilotlab_admin.check_startup_role(p_role) THEN
        RAISE EXCEPTION 'no startup role %', p_role USING ERRCODE = 'undefined_object';
    END IF;
    IF p_verifier IS NULL THEN
        EXECUTE format('ALTER ROLE %I NOLOGIN PASSWORD NULL', p_role);
        PERFORM pg_terminate_backend(a.pid) FROM pg_stat_activity a
          WHERE a.usename = p_role AND a.pid <> pg_backend_pid();
    ELSIF p_verifier ~ '^SCRAM-SHA-256\$[0-9]+:[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+:[A-Za-z0-9+/=]+$' THEN
        EXECUTE format('ALTER ROLE %I LOGIN PASSWORD %L', p_role, p_verifier);
    ELSE
        RAISE EXCEPTION 'a SCRAM-SHA-256 verifier is required' USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;

-- startup roles made before a setting of ensure_startup_role (the search_path of migration
-- 0044) get it here, through the same function; a role that check_startup_role refuses is left
-- alone, said in a warning (not an abort of this whole file)
DO $$
DECLARE
    r text;
BEGIN
    FOR r IN SELECT x.rolname FROM pg_roles x JOIN pg_auth_members m ON m.member = x.oid
              WHERE m.roleid = 'pilotlab_startups'::regrole AND x.rolname ~ '^startup_[a-z0-9_]{1,55}$' LOOP
        BEGIN
            PERFORM pilotlab_admin.ensure_startup_role(r);
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE WARNING 'role % left as it is: %', r, SQLERRM;
        END;
    END LOOP;
END
$$;

REVOKE ALL ON FUNCTION pilotlab_admin.check_startup_role(text), pilotlab_admin.ensure_startup_role(text),
                       pilotlab_admin.set_startup_login(text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pilotlab_admin.ensure_startup_role(text), pilotlab_admin.set_startup_login(text, text)
    TO pilotlab_owner;

-- the startups connect to the application's database only (CONNECT comes with the group)
DO $$
BEGIN
    IF NOT (SELECT datistemplate FROM pg_database WHERE datname = current_database()) THEN
        EXECUTE format('GRANT CONNECT ON DATABASE %I TO pilotlab_startups', current_database());
    END IF;
END
$$;
