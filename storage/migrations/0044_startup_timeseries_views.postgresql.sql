-- Plain-PostgreSQL mode: the startups' time series are filtered by row-level security (0031),
-- so schema pilotlab_startup stays empty here. It exists in both modes so that a startup
-- role's search_path (pilotlab_startup, public: storage/roles.sql, storage.access.scoped) is
-- the same in both; in TimescaleDB mode it holds the per-startup views (0044's variant).
CREATE SCHEMA IF NOT EXISTS pilotlab_startup;
REVOKE ALL ON SCHEMA pilotlab_startup FROM PUBLIC;
GRANT USAGE ON SCHEMA pilotlab_startup TO pilotlab_startups;

-- the startup lookup of the policies (0030), with its table qualified: it ran with the
-- caller's search_path, where a temporary table could stand in for startup_roles (no role of
-- pilotlab's may create one; a database made by hand might allow it)
CREATE OR REPLACE FUNCTION pilotlab_current_startup() RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT s.startup FROM public.startup_roles s WHERE s.role = current_user::text
$$;
