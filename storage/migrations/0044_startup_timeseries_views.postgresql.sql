-- Plain-PostgreSQL mode: the startups' time series are filtered by row-level security (0031),
-- so schema pilotlab_startup stays empty here. It exists in both modes so that a startup
-- role's search_path (pilotlab_startup, public: storage/roles.sql, storage.access.scoped) is
-- the same in both; in TimescaleDB mode it holds the per-startup views (0044's variant).
CREATE SCHEMA IF NOT EXISTS pilotlab_startup;
REVOKE ALL ON SCHEMA pilotlab_startup FROM PUBLIC;
GRANT USAGE ON SCHEMA pilotlab_startup TO pilotlab_startups;
