-- The read-only login Grafana uses. Created only when missing, without a password (set one
-- with ALTER ROLE grafana_reader PASSWORD '...'; storage/roles.sql, run by the embedded stack
-- and by docker-compose's first start, does); an existing role's password is never touched.
-- SELECT only, read-only transactions, and a statement timeout so that a heavy dashboard
-- cannot hold the database (defaults the role can change itself: see docs/operations.md).
-- 0022 takes CONNECT and TEMP away from PUBLIC and grants CONNECT to grafana_reader.
--
-- Fixed after the fact: this migration used to assume a superuser migrator. Run by the owner
-- role (no CREATEROLE), it cannot change another role's settings: it leaves them to
-- storage/roles.sql then, and it can only create the role where the migrator may.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'grafana_reader') THEN
        IF NOT (SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user) THEN
            RAISE EXCEPTION 'role grafana_reader does not exist and % may not create it', current_user
                USING HINT = 'create the roles first: run storage/roles.sql as a superuser (docs/operations.md)';
        END IF;
        CREATE ROLE grafana_reader LOGIN;
    END IF;
    IF (SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user) THEN
        ALTER ROLE grafana_reader SET statement_timeout = '30s';
        ALTER ROLE grafana_reader SET default_transaction_read_only = on;
    END IF;
END
$$;
GRANT USAGE ON SCHEMA public TO grafana_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO grafana_reader;
-- tables and views created later by `pilotlab db migrate` are readable too
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO grafana_reader;
