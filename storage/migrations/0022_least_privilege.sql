-- Least privilege (docs/operations.md, "Database roles and privileges"). Run by the owner role
-- (pilotlab_owner: owns the database and the schema's objects, no superuser); the roles
-- themselves come from storage/roles.sql, run by a superuser.
--
--   pilotlab_writer  the sink: SELECT and INSERT on the tables it writes (SELECT because
--                    ON CONFLICT (key) and the staging table's LIKE read them), UPDATE where
--                    it upserts, DELETE on devices only (a manifest that drops a device);
--                    TEMP for its COPY staging table. Nothing else.
--   grafana_reader   SELECT on every table and view (0005), no TEMP.
--
-- A later migration that adds a table the sink writes must GRANT it to pilotlab_writer
-- explicitly: the writer has no default privileges.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pilotlab_writer') THEN
        IF NOT (SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user) THEN
            RAISE EXCEPTION 'role pilotlab_writer does not exist and % may not create it', current_user
                USING HINT = 'create the roles first: run storage/roles.sql as a superuser (docs/operations.md)';
        END IF;
        -- no login until storage/roles.sql makes it one (with a password)
        CREATE ROLE pilotlab_writer NOLOGIN;
    END IF;
END
$$;

-- Nobody but the owner creates anything: no CREATE on the schema (PostgreSQL 15's default,
-- stated), no CONNECT or TEMP for PUBLIC (PostgreSQL grants both to PUBLIC on every new
-- database); CONNECT for the two roles, TEMP for the writer alone.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
-- A template database keeps its ACL: PGlite (the TimescaleDB test target) runs its one
-- session in template1, whose pg_database row it cannot update; pilotlab never runs in one.
DO $$
BEGIN
    IF NOT (SELECT datistemplate FROM pg_database WHERE datname = current_database()) THEN
        EXECUTE format('REVOKE ALL ON DATABASE %I FROM PUBLIC', current_database());
        EXECUTE format('GRANT CONNECT ON DATABASE %I TO pilotlab_writer, grafana_reader', current_database());
        EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO pilotlab_writer', current_database());
    END IF;
END
$$;

-- the sink's tables, and only those
REVOKE ALL ON ALL TABLES IN SCHEMA public FROM pilotlab_writer;
GRANT SELECT, INSERT ON readings, late_readings, device_status, rejections TO pilotlab_writer;
GRANT SELECT, INSERT, UPDATE ON kpi_values, experiments TO pilotlab_writer;
GRANT SELECT, INSERT, UPDATE, DELETE ON devices TO pilotlab_writer;

-- the reader: everything readable, also what later migrations create (the default privileges
-- of 0005 belong to whoever ran it; these are the owner's)
GRANT SELECT ON ALL TABLES IN SCHEMA public TO grafana_reader;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO grafana_reader;

-- retention deletes rows: the owner's job (cron), not something a login role may trigger
REVOKE EXECUTE ON FUNCTION apply_retention() FROM PUBLIC;
