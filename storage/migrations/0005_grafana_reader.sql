-- The read-only login Grafana uses. Created only when missing, without a password (set one
-- with ALTER ROLE grafana_reader PASSWORD '...'; docker-compose's initdb script does);
-- an existing role's password is never touched. SELECT only, read-only transactions, and a
-- statement timeout so that a heavy dashboard cannot hold the database. CONNECT comes from
-- PUBLIC's default grant (revoke it there and grant it to grafana_reader if you harden it).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'grafana_reader') THEN
        CREATE ROLE grafana_reader LOGIN;
    END IF;
END
$$;
ALTER ROLE grafana_reader SET statement_timeout = '30s';
ALTER ROLE grafana_reader SET default_transaction_read_only = on;
GRANT USAGE ON SCHEMA public TO grafana_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO grafana_reader;
-- tables and views created later by `pilotlab db migrate` are readable too
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO grafana_reader;
