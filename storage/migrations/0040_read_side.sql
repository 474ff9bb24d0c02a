-- One read side (docs/dashboards.md): every Grafana panel and the HTML report read through the
-- named functions of the query layer, never a table. Plain SQL functions run as their caller
-- (no SECURITY DEFINER), so each role's privileges and row-level security still apply; the
-- reader executes them (EXECUTE is granted at the end).

-- --- KPI kinds and the period summary ---------------------------------------------------------

-- How each KPI kind's windows fold over a period: pilotlab/kpi_kinds.py's registry, copied
-- (tests/unit/test_query_layer.py proves this table equals the registry).
CREATE TABLE kpi_kinds (
    kind        text PRIMARY KEY,
    period_fold text CHECK (period_fold IN ('sum', 'weighted_mean', 'min', 'max', 'pooled', 'window_mean')),
    numerator   text,  -- pooled: the details' keys whose sums divide
    denominator text,
    CHECK ((period_fold = 'pooled') = (numerator IS NOT NULL AND denominator IS NOT NULL))
);
INSERT INTO kpi_kinds (kind, period_fold, numerator, denominator) VALUES
    ('count', 'sum', NULL, NULL),
    ('sum', 'sum', NULL, NULL),
    ('mean', 'weighted_mean', NULL, NULL),
    ('min', 'min', NULL, NULL),
    ('max', 'max', NULL, NULL),
    ('quantile', 'window_mean', NULL, NULL),
    ('exceedance', 'pooled', 'above', 'samples'),
    ('availability', 'window_mean', NULL, NULL),
    ('completeness', 'pooled', 'received', 'expected'),
    ('freshness', 'window_mean', NULL, NULL),
    ('impact', NULL, NULL, NULL);

-- kpi_period_summary (0002) and streams_period_overview (0020) were two folds of the same
-- windows; one remains, by the kinds' rules: count/sum add up, mean is weighted by samples,
-- min/max are the extremes, exceedance and completeness are pooled from their details (exact),
-- availability, quantile and freshness average their window values. Kinds without windows
-- (impact: streams_impact) are left out. streams_period_overview stays, for one release, as
-- the same function under its old name (it computes nothing of its own).
CREATE OR REPLACE FUNCTION kpi_period_summary(p_experiment text)
RETURNS TABLE (kpi text, metric text, kind text, device_group text, period text,
               value double precision, sample_count numeric, windows bigint)
LANGUAGE sql STABLE AS $$
    WITH w AS (
        SELECT k.*, f.period_fold, f.numerator, f.denominator,
               CASE WHEN k.window_start >= e.intervention_start AND k.window_start < e.intervention_end
                        THEN 'intervention'
                    WHEN k.window_start >= e.baseline_start AND k.window_start < e.baseline_end
                        THEN 'baseline'
               END AS period
          FROM kpi_values k
          JOIN experiments e USING (experiment_id)
          JOIN kpi_kinds f ON f.kind = k.kind
         WHERE k.experiment_id = p_experiment AND f.period_fold IS NOT NULL
    )
    SELECT w.kpi, w.metric, w.kind, w.device_group, w.period,
           CASE min(w.period_fold)
               WHEN 'weighted_mean' THEN sum(w.value * w.sample_count) / nullif(sum(w.sample_count), 0)
               WHEN 'min' THEN min(w.value)
               WHEN 'max' THEN max(w.value)
               WHEN 'sum' THEN sum(w.value)
               WHEN 'pooled' THEN sum((w.details->>w.numerator)::double precision)
                                  / nullif(sum((w.details->>w.denominator)::double precision), 0)
               ELSE avg(w.value)
           END,
           sum(w.sample_count),
           count(*)
      FROM w
     WHERE w.period IS NOT NULL
     GROUP BY w.kpi, w.metric, w.kind, w.device_group, w.period
     ORDER BY w.kpi, w.device_group DESC, w.period
$$;

CREATE OR REPLACE FUNCTION streams_period_overview(p_experiment text)
RETURNS TABLE (kpi text, metric text, kind text, device_group text, period text,
               value double precision, sample_count numeric, windows bigint)
LANGUAGE sql STABLE AS $$
    SELECT * FROM kpi_period_summary(p_experiment)
$$;
COMMENT ON FUNCTION streams_period_overview(text) IS 'deprecated: kpi_period_summary under its old name';

-- The KPIs of an experiment that have windows (the $kpi variable), from its KPI values.
CREATE FUNCTION experiment_kpis(p_experiment text)
RETURNS TABLE (kpi text, kind text)
LANGUAGE sql STABLE AS $$
    SELECT DISTINCT k.kpi, k.kind
      FROM kpi_values k
      JOIN kpi_kinds f ON f.kind = k.kind
     WHERE k.experiment_id = p_experiment AND f.period_fold IS NOT NULL
     ORDER BY k.kpi
$$;

-- --- experiments ------------------------------------------------------------------------------

-- Every experiment (the $experiment variable, the report's list of known ids).
CREATE FUNCTION experiment_list()
RETURNS TABLE (experiment_id text, title text, startup text, district text)
LANGUAGE sql STABLE AS $$
    SELECT e.experiment_id, e.title, e.startup, e.district FROM experiments e ORDER BY e.title, e.experiment_id
$$;

-- One experiment: its periods and manifest, and the datapoints stored for it.
CREATE FUNCTION experiment_info(p_experiment text)
RETURNS TABLE (experiment_id text, title text, startup text, district text,
               baseline_start timestamptz, baseline_end timestamptz,
               intervention_start timestamptz, intervention_end timestamptz,
               manifest jsonb, readings bigint)
LANGUAGE sql STABLE AS $$
    SELECT e.experiment_id, e.title, e.startup, e.district, e.baseline_start, e.baseline_end,
           e.intervention_start, e.intervention_end, e.manifest,
           (SELECT count(*) FROM readings r WHERE r.experiment_id = e.experiment_id)
      FROM experiments e
     WHERE e.experiment_id = p_experiment
$$;

-- The last status the streams worker reported for each registered device (NULL: none yet).
CREATE FUNCTION device_last_status(p_experiment text DEFAULT NULL)
RETURNS TABLE (experiment_id text, device_id text, device_group text, kind text,
               latitude double precision, longitude double precision, status text, status_since timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT d.experiment_id, d.device_id, d.device_group, d.kind, d.lat, d.lon, s.status, s.ts
      FROM devices d
      LEFT JOIN LATERAL (
            SELECT ds.status, ds.ts FROM device_status ds
             WHERE ds.device_id = d.device_id ORDER BY ds.ts DESC LIMIT 1) s ON true
     WHERE p_experiment IS NULL OR d.experiment_id = p_experiment
     ORDER BY d.experiment_id, d.device_group DESC, d.device_id
$$;

-- Every experiment over [p_from, p_to]: devices by status, message rate (distinct device
-- instants received per minute), rejection rate (refused / refused + accepted messages) and
-- its headline impact KPI (the first by name) with the details streams stored.
CREATE FUNCTION experiments_overview(p_from timestamptz, p_to timestamptz)
RETURNS TABLE (experiment_id text, title text, startup text, district text,
               devices bigint, online bigint, offline bigint,
               messages_per_min double precision, rejection_rate double precision,
               headline_kpi text, headline_details jsonb)
LANGUAGE sql STABLE AS $$
    WITH span AS (
        SELECT greatest(extract(epoch FROM p_to - p_from) / 60, 1)::double precision AS minutes),
    msgs AS (
        SELECT r.experiment_id, count(DISTINCT (r.device_id, r.ts)) AS n FROM readings r
         WHERE r.received_at BETWEEN p_from AND p_to GROUP BY r.experiment_id),
    rej AS (
        SELECT r.experiment_id, count(*) AS n FROM rejections r
         WHERE r.received_at BETWEEN p_from AND p_to GROUP BY r.experiment_id),
    status AS (
        SELECT s.experiment_id, count(*) AS devices,
               count(*) FILTER (WHERE s.status = 'online') AS online,
               count(*) FILTER (WHERE s.status = 'offline') AS offline
          FROM device_last_status(NULL) s
         GROUP BY s.experiment_id),
    headline AS (
        SELECT DISTINCT ON (k.experiment_id) k.experiment_id, k.kpi, k.details
          FROM kpi_values k WHERE k.kind = 'impact'
         ORDER BY k.experiment_id, k.kpi)
    SELECT e.experiment_id, e.title, e.startup, e.district,
           coalesce(st.devices, 0), coalesce(st.online, 0), coalesce(st.offline, 0),
           coalesce(m.n, 0) / span.minutes,
           100.0 * coalesce(r.n, 0) / nullif(coalesce(r.n, 0) + coalesce(m.n, 0), 0),
           h.kpi, h.details
      FROM experiments e
     CROSS JOIN span
      LEFT JOIN status st USING (experiment_id)
      LEFT JOIN msgs m USING (experiment_id)
      LEFT JOIN rej r USING (experiment_id)
      LEFT JOIN headline h USING (experiment_id)
     ORDER BY e.title
$$;

-- Traffic over [p_from, p_to]: datapoints stored, rejections and late readings received, and
-- the seconds since the newest stored reading arrived.
CREATE FUNCTION traffic_summary(p_from timestamptz, p_to timestamptz)
RETURNS TABLE (datapoints bigint, rejections bigint, late_readings bigint, experiments bigint,
               seconds_since_last_stored double precision)
LANGUAGE sql STABLE AS $$
    SELECT (SELECT count(*) FROM readings WHERE received_at BETWEEN p_from AND p_to),
           (SELECT count(*) FROM rejections WHERE received_at BETWEEN p_from AND p_to),
           (SELECT count(*) FROM late_readings WHERE received_at BETWEEN p_from AND p_to),
           (SELECT count(*) FROM experiments),
           extract(epoch FROM now() - (SELECT max(received_at) FROM readings))::double precision
$$;

-- Messages (distinct device instants) received per experiment and time bucket.
CREATE FUNCTION message_rate(p_bucket interval, p_from timestamptz, p_to timestamptz)
RETURNS TABLE (bucket timestamptz, experiment_id text, messages bigint)
LANGUAGE sql STABLE AS $$
    SELECT time_bucket(p_bucket, r.received_at) AS b, r.experiment_id, count(DISTINCT (r.device_id, r.ts))
      FROM readings r
     WHERE r.received_at BETWEEN p_from AND p_to
     GROUP BY b, r.experiment_id
     ORDER BY b, r.experiment_id
$$;

-- Rows stored per pipeline stage and time bucket (by arrival: received_at, updated_at).
CREATE FUNCTION pipeline_throughput(p_bucket interval, p_from timestamptz, p_to timestamptz)
RETURNS TABLE (bucket timestamptz, stage text, row_count bigint)
LANGUAGE sql STABLE AS $$
    SELECT time_bucket(p_bucket, s.t) AS b, s.stage, count(*)
      FROM (SELECT received_at AS t, 'datapoints stored' AS stage FROM readings
             WHERE received_at BETWEEN p_from AND p_to
            UNION ALL
            SELECT received_at, 'dead letters' FROM rejections WHERE received_at BETWEEN p_from AND p_to
            UNION ALL
            SELECT received_at, 'late readings' FROM late_readings WHERE received_at BETWEEN p_from AND p_to
            UNION ALL
            SELECT updated_at, 'KPI windows updated' FROM kpi_values WHERE updated_at BETWEEN p_from AND p_to
           ) s
     GROUP BY b, s.stage
     ORDER BY b, s.stage
$$;

-- --- rejections -------------------------------------------------------------------------------

-- Rejections per reason (0002), now optionally over [p_from, p_to] by arrival.
DROP FUNCTION IF EXISTS rejections_by_reason(text);
CREATE FUNCTION rejections_by_reason(p_experiment text, p_from timestamptz DEFAULT NULL,
                                     p_to timestamptz DEFAULT NULL)
RETURNS TABLE (reason text, rejections bigint, last_seen timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT r.reason, count(*), max(r.received_at)
      FROM rejections r
     WHERE (p_experiment IS NULL OR r.experiment_id = p_experiment)
       AND (p_from IS NULL OR r.received_at >= p_from)
       AND (p_to IS NULL OR r.received_at <= p_to)
     GROUP BY r.reason
     ORDER BY count(*) DESC, r.reason
$$;

-- Rejections per device and reason over [p_from, p_to], with the newest detail the device was told.
CREATE FUNCTION device_rejections(p_experiment text, p_from timestamptz, p_to timestamptz)
RETURNS TABLE (device_id text, reason text, rejections bigint, last_seen timestamptz, latest_detail text)
LANGUAGE sql STABLE AS $$
    SELECT coalesce(r.device_id, '(no device id)'), r.reason, count(*), max(r.received_at),
           (array_agg(r.detail ORDER BY r.received_at DESC))[1]
      FROM rejections r
     WHERE r.experiment_id = p_experiment AND r.received_at BETWEEN p_from AND p_to
     GROUP BY 1, 2
     ORDER BY 3 DESC, 1, 2
$$;

-- The newest rejections over [p_from, p_to] (all experiments when p_experiment is NULL).
CREATE FUNCTION latest_rejections(p_experiment text, p_from timestamptz, p_to timestamptz,
                                  p_limit integer DEFAULT 200)
RETURNS TABLE (received_at timestamptz, reason text, experiment_id text, device_id text, topic text,
               detail text)
LANGUAGE sql STABLE AS $$
    SELECT r.received_at, r.reason, r.experiment_id, r.device_id, r.topic, r.detail
      FROM rejections r
     WHERE (p_experiment IS NULL OR r.experiment_id = p_experiment)
       AND r.received_at BETWEEN p_from AND p_to
     ORDER BY r.received_at DESC
     LIMIT p_limit
$$;

-- --- devices ----------------------------------------------------------------------------------

-- Samples per device and hour (event time, from the hourly rollup; the densest metric's count).
CREATE FUNCTION device_samples_hourly(p_experiment text, p_from timestamptz, p_to timestamptz)
RETURNS TABLE (bucket timestamptz, device_id text, device_group text, samples bigint)
LANGUAGE sql STABLE AS $$
    SELECT r.bucket, r.device_id, min(r.device_group), max(r.samples)::bigint
      FROM readings_1h r
     WHERE r.experiment_id = p_experiment AND r.bucket BETWEEN p_from AND p_to
     GROUP BY 1, 2
     ORDER BY 1, 2
$$;

-- Completeness per group and hour: samples received / expected from the devices' intervals.
CREATE FUNCTION group_completeness_hourly(p_experiment text, p_from timestamptz, p_to timestamptz)
RETURNS TABLE (bucket timestamptz, device_group text, completeness double precision)
LANGUAGE sql STABLE AS $$
    WITH per AS (SELECT * FROM device_samples_hourly(p_experiment, p_from, p_to)),
         b AS (SELECT DISTINCT bucket FROM per)
    SELECT b.bucket, d.device_group,
           coalesce(sum(per.samples), 0) / sum(3600.0 / d.interval_s)::double precision
      FROM b
     CROSS JOIN devices d
      LEFT JOIN per ON per.bucket = b.bucket AND per.device_id = d.device_id
     WHERE d.experiment_id = p_experiment
     GROUP BY 1, 2
     ORDER BY 1, 2
$$;

-- --- privileges -------------------------------------------------------------------------------

GRANT SELECT ON kpi_kinds TO grafana_reader;
GRANT EXECUTE ON FUNCTION kpi_period_summary(text), experiment_kpis(text), experiment_list(),
    experiment_info(text), device_last_status(text), experiments_overview(timestamptz, timestamptz),
    traffic_summary(timestamptz, timestamptz), message_rate(interval, timestamptz, timestamptz),
    pipeline_throughput(interval, timestamptz, timestamptz),
    rejections_by_reason(text, timestamptz, timestamptz), device_rejections(text, timestamptz, timestamptz),
    latest_rejections(text, timestamptz, timestamptz, integer),
    device_samples_hourly(text, timestamptz, timestamptz),
    group_completeness_hourly(text, timestamptz, timestamptz)
    TO grafana_reader;
-- the startups' roles (0030) read the kinds too: reference data, no startup's rows in it
GRANT SELECT ON kpi_kinds TO pilotlab_startups;
