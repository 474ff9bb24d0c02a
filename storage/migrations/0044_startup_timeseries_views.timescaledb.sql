-- A startup's own time series in TimescaleDB mode (0031 refused them: TimescaleDB has no
-- row-level security on compressed hypertables, their chunks or continuous aggregates).
--
-- Schema pilotlab_startup holds one view per time-series relation, under the same name, with
-- the rows of the current role's startup only: a view reads its tables with its owner's rights
-- (the owner of the hypertables), and current_user in it is still the caller, mapped to its
-- startup by pilotlab_current_startup() (no startup, so no row, for any other role). Every name
-- in them and in that function (re-made below) is schema-qualified: a caller's search_path (or
-- a temporary table of the same name) changes nothing. The views are security_barrier, so a
-- caller's condition that could fail or leak runs after their filter.
--
-- Their columns are the relation's when the view was made (SELECT * is expanded then): a
-- migration that adds a column to one of these relations re-creates its view.
--
-- A startup role's search_path starts with pilotlab_startup (its SQL login: ALTER ROLE in
-- storage/roles.sql; the portal: SET LOCAL in storage.access.scoped), so `readings` and the
-- query functions that read it (plain SQL, names resolved at each call) take its rows from
-- these views. public.readings and the chunks stay refused to it (0031). docs/access.md.

-- The startup lookup of the views below and of the policies of 0030/0031, with its table
-- qualified: it ran with the caller's search_path, where a temporary table could stand in for
-- startup_roles (no role of pilotlab's may create one; a database made by hand might allow it).
CREATE OR REPLACE FUNCTION pilotlab_current_startup() RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT s.startup FROM public.startup_roles s WHERE s.role = current_user::text
$$;

CREATE SCHEMA IF NOT EXISTS pilotlab_startup;
REVOKE ALL ON SCHEMA pilotlab_startup FROM PUBLIC;
GRANT USAGE ON SCHEMA pilotlab_startup TO pilotlab_startups;

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['readings', 'late_readings', 'kpi_values', 'readings_1m', 'readings_1h'] LOOP
        EXECUTE format(
            'CREATE VIEW pilotlab_startup.%1$I WITH (security_barrier) AS SELECT * FROM public.%1$I'
            ' WHERE experiment_id IN (SELECT e.experiment_id FROM public.experiments e'
            '                          WHERE e.startup = public.pilotlab_current_startup())', t);
        EXECUTE format('COMMENT ON VIEW pilotlab_startup.%1$I IS %2$L', t,
                       'public.' || t || ', the rows of the current startup role''s experiments only (migration 0044)');
        EXECUTE format('REVOKE ALL ON pilotlab_startup.%I FROM PUBLIC', t);
        EXECUTE format('GRANT SELECT ON pilotlab_startup.%I TO pilotlab_startups', t);
    END LOOP;
END
$$;
