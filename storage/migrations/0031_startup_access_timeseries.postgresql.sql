-- Per-startup isolation of the time series (see 0030), plain-PostgreSQL mode: row-level
-- security on readings, late_readings and kpi_values like the other tables, and the rollups
-- readings_1m / readings_1h (plain views, 0004) made security_invoker, so that reading them as
-- a startup applies the policies of readings. A view without it reads its tables with its
-- owner's rights and would show every startup's rows.
DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['readings', 'late_readings', 'kpi_values'] LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('CREATE POLICY lab_write ON %I TO pilotlab_writer USING (true) WITH CHECK (true)', t);
        EXECUTE format('CREATE POLICY lab_read ON %I FOR SELECT TO grafana_reader USING (true)', t);
        EXECUTE format('CREATE POLICY startup_own ON %I FOR SELECT TO pilotlab_startups'
                       ' USING (experiment_id IN (SELECT e.experiment_id FROM experiments e'
                       '                           WHERE e.startup = pilotlab_current_startup()))', t);
    END LOOP;
END
$$;

ALTER VIEW readings_1m SET (security_invoker = true);
ALTER VIEW readings_1h SET (security_invoker = true);

GRANT SELECT ON readings, late_readings, kpi_values, readings_1m, readings_1h TO pilotlab_startups;
