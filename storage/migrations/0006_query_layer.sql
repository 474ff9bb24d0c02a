-- The query layer for dashboards and reports: parameterised SQL functions, identical in the
-- TimescaleDB and plain-PostgreSQL modes (they read readings_1m / readings_1h, which are
-- continuous aggregates or plain views, and use time_bucket()). See README, Storage.

-- Which period an instant belongs to in an experiment ('baseline', 'intervention' or NULL).
CREATE FUNCTION experiment_period(p_experiment text, p_ts timestamptz) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN p_ts >= e.intervention_start AND p_ts < e.intervention_end THEN 'intervention'
                WHEN p_ts >= e.baseline_start AND p_ts < e.baseline_end THEN 'baseline'
           END
      FROM experiments e WHERE e.experiment_id = p_experiment
$$;

-- One KPI's windows over time, both groups (the current revision of each window).
CREATE FUNCTION kpi_series(p_experiment text, p_kpi text,
                           p_from timestamptz DEFAULT NULL, p_to timestamptz DEFAULT NULL)
RETURNS TABLE (window_start timestamptz, window_end timestamptz, window_size_s integer,
               device_group text, value double precision, sample_count bigint, revision integer,
               period text, details jsonb)
LANGUAGE sql STABLE AS $$
    SELECT k.window_start, k.window_end, k.window_size_s, k.device_group, k.value, k.sample_count,
           k.revision,
           CASE WHEN k.window_start >= e.intervention_start AND k.window_start < e.intervention_end
                    THEN 'intervention'
                WHEN k.window_start >= e.baseline_start AND k.window_start < e.baseline_end
                    THEN 'baseline'
           END,
           k.details
      FROM kpi_values k
      JOIN experiments e USING (experiment_id)
     WHERE k.experiment_id = p_experiment AND k.kpi = p_kpi
       AND (p_from IS NULL OR k.window_start >= p_from)
       AND (p_to IS NULL OR k.window_start < p_to)
     ORDER BY k.window_start, k.device_group
$$;

-- Baseline vs intervention per KPI and group (folded as kpi_period_summary folds them);
-- change = intervention / baseline - 1.
CREATE FUNCTION kpi_baseline_vs_intervention(p_experiment text)
RETURNS TABLE (kpi text, metric text, kind text, device_group text,
               baseline double precision, intervention double precision, change double precision,
               baseline_samples numeric, intervention_samples numeric)
LANGUAGE sql STABLE AS $$
    SELECT s.kpi, s.metric, s.kind, s.device_group,
           max(s.value) FILTER (WHERE s.period = 'baseline'),
           max(s.value) FILTER (WHERE s.period = 'intervention'),
           max(s.value) FILTER (WHERE s.period = 'intervention')
               / nullif(max(s.value) FILTER (WHERE s.period = 'baseline'), 0) - 1,
           max(s.sample_count) FILTER (WHERE s.period = 'baseline'),
           max(s.sample_count) FILTER (WHERE s.period = 'intervention')
      FROM kpi_period_summary(p_experiment) s
     GROUP BY s.kpi, s.metric, s.kind, s.device_group
     ORDER BY s.kpi, s.device_group DESC
$$;

-- Treatment vs control per KPI and period; difference = treatment - control,
-- ratio = treatment / control - 1.
CREATE FUNCTION kpi_treatment_vs_control(p_experiment text)
RETURNS TABLE (kpi text, metric text, kind text, period text,
               treatment double precision, control double precision,
               difference double precision, ratio double precision)
LANGUAGE sql STABLE AS $$
    SELECT s.kpi, s.metric, s.kind, s.period,
           max(s.value) FILTER (WHERE s.device_group = 'treatment'),
           max(s.value) FILTER (WHERE s.device_group = 'control'),
           max(s.value) FILTER (WHERE s.device_group = 'treatment')
               - max(s.value) FILTER (WHERE s.device_group = 'control'),
           max(s.value) FILTER (WHERE s.device_group = 'treatment')
               / nullif(max(s.value) FILTER (WHERE s.device_group = 'control'), 0) - 1
      FROM kpi_period_summary(p_experiment) s
     GROUP BY s.kpi, s.metric, s.kind, s.period
     ORDER BY s.kpi, s.period
$$;

-- The impact per KPI: relative difference-in-differences (T_int/T_base)/(C_int/C_base) - 1,
-- or the treatment group's before/after change when there is no control group.
CREATE FUNCTION kpi_impact(p_experiment text)
RETURNS TABLE (kpi text, metric text, kind text, treatment_change double precision,
               control_change double precision, impact double precision, method text)
LANGUAGE sql STABLE AS $$
    SELECT t.kpi, t.metric, t.kind, t.change, c.change,
           CASE WHEN c.kpi IS NULL THEN t.change
                ELSE (1 + t.change) / nullif(1 + c.change, 0) - 1 END,
           CASE WHEN c.kpi IS NULL THEN 'before/after (treatment only)'
                ELSE 'difference-in-differences vs control (relative)' END
      FROM kpi_baseline_vs_intervention(p_experiment) t
      LEFT JOIN kpi_baseline_vs_intervention(p_experiment) c
             ON c.kpi = t.kpi AND c.device_group = 'control'
     WHERE t.device_group = 'treatment'
     ORDER BY t.kpi
$$;

-- A metric of one experiment per group and time bucket (from the minute or hour rollups;
-- p_bucket a multiple of a minute, or of an hour when it is at least an hour).
CREATE FUNCTION metric_series(p_experiment text, p_metric text, p_bucket interval,
                              p_from timestamptz, p_to timestamptz)
RETURNS TABLE (bucket timestamptz, device_group text, samples bigint, mean double precision,
               min_value double precision, max_value double precision)
LANGUAGE sql STABLE AS $$
    WITH r AS (
        SELECT bucket, device_group, samples, total, min_value, max_value FROM readings_1h
         WHERE p_bucket >= INTERVAL '1 hour'
           AND experiment_id = p_experiment AND metric = p_metric AND bucket >= p_from AND bucket < p_to
        UNION ALL
        SELECT bucket, device_group, samples, total, min_value, max_value FROM readings_1m
         WHERE p_bucket < INTERVAL '1 hour'
           AND experiment_id = p_experiment AND metric = p_metric AND bucket >= p_from AND bucket < p_to
    )
    SELECT time_bucket(p_bucket, r.bucket) AS b, r.device_group, sum(r.samples)::bigint,
           sum(r.total) / nullif(sum(r.samples), 0), min(r.min_value), max(r.max_value)
      FROM r
     GROUP BY b, r.device_group
     ORDER BY b, r.device_group
$$;

-- One device's metric per time bucket (same rollups and rules as metric_series).
CREATE FUNCTION device_series(p_device text, p_metric text, p_bucket interval,
                              p_from timestamptz, p_to timestamptz)
RETURNS TABLE (bucket timestamptz, samples bigint, mean double precision,
               min_value double precision, max_value double precision)
LANGUAGE sql STABLE AS $$
    WITH r AS (
        SELECT bucket, samples, total, min_value, max_value FROM readings_1h
         WHERE p_bucket >= INTERVAL '1 hour'
           AND device_id = p_device AND metric = p_metric AND bucket >= p_from AND bucket < p_to
        UNION ALL
        SELECT bucket, samples, total, min_value, max_value FROM readings_1m
         WHERE p_bucket < INTERVAL '1 hour'
           AND device_id = p_device AND metric = p_metric AND bucket >= p_from AND bucket < p_to
    )
    SELECT time_bucket(p_bucket, r.bucket) AS b, sum(r.samples)::bigint,
           sum(r.total) / nullif(sum(r.samples), 0), min(r.min_value), max(r.max_value)
      FROM r
     GROUP BY b
     ORDER BY b
$$;

-- Device health over [p_from, p_to) (default: the experiment's baseline start until now or
-- the intervention end): last sample, the last status the streams worker reported, and
-- completeness = distinct sample instants / the instants expected from devices.interval_s.
CREATE FUNCTION device_health(p_experiment text, p_from timestamptz DEFAULT NULL,
                              p_to timestamptz DEFAULT NULL)
RETURNS TABLE (device_id text, device_group text, kind text, interval_s integer,
               last_seen timestamptz, status text, status_since timestamptz,
               samples bigint, expected bigint, completeness double precision)
LANGUAGE sql STABLE AS $$
    WITH span AS (
        SELECT coalesce(p_from, e.baseline_start) AS t0,
               coalesce(p_to, least(now(), e.intervention_end)) AS t1
          FROM experiments e WHERE e.experiment_id = p_experiment
    )
    SELECT d.device_id, d.device_group, d.kind, d.interval_s,
           (SELECT max(r.ts) FROM readings r WHERE r.device_id = d.device_id),
           st.status, st.ts,
           cnt.n,
           greatest(floor(extract(epoch FROM span.t1 - span.t0) / d.interval_s), 0)::bigint,
           cnt.n / nullif(floor(extract(epoch FROM span.t1 - span.t0) / d.interval_s), 0)
      FROM devices d
     CROSS JOIN span
      LEFT JOIN LATERAL (
            SELECT s.status, s.ts FROM device_status s
             WHERE s.device_id = d.device_id ORDER BY s.ts DESC LIMIT 1) st ON true
     CROSS JOIN LATERAL (
            SELECT count(DISTINCT r.ts) AS n FROM readings r
             WHERE r.device_id = d.device_id AND r.ts >= span.t0 AND r.ts < span.t1) cnt
     WHERE d.experiment_id = p_experiment
     ORDER BY d.device_group DESC, d.device_id
$$;

-- Rejections per time bucket and reason (all experiments when p_experiment is NULL).
CREATE FUNCTION rejections_timeline(p_experiment text, p_bucket interval,
                                    p_from timestamptz, p_to timestamptz)
RETURNS TABLE (bucket timestamptz, reason text, rejections bigint)
LANGUAGE sql STABLE AS $$
    SELECT time_bucket(p_bucket, r.received_at) AS b, r.reason, count(*)
      FROM rejections r
     WHERE (p_experiment IS NULL OR r.experiment_id = p_experiment)
       AND r.received_at >= p_from AND r.received_at < p_to
     GROUP BY b, r.reason
     ORDER BY b, r.reason
$$;
