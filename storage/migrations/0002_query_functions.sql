-- The query layer: parameterised SQL functions used by the demo, reports and dashboards.

-- Each KPI folded over the baseline and the intervention period, per device group.
-- Means are weighted by the samples in each window; counts and sums add up.
CREATE OR REPLACE FUNCTION kpi_period_summary(p_experiment text)
RETURNS TABLE (kpi text, metric text, kind text, device_group text, period text,
               value double precision, sample_count numeric, windows bigint)
LANGUAGE sql STABLE AS $$
    WITH w AS (
        SELECT k.*,
               CASE WHEN k.window_start >= e.intervention_start AND k.window_start < e.intervention_end
                        THEN 'intervention'
                    WHEN k.window_start >= e.baseline_start AND k.window_start < e.baseline_end
                        THEN 'baseline'
               END AS period
          FROM kpi_values k
          JOIN experiments e USING (experiment_id)
         WHERE k.experiment_id = p_experiment
    )
    SELECT w.kpi, w.metric, w.kind, w.device_group, w.period,
           CASE w.kind
               WHEN 'mean' THEN sum(w.value * w.sample_count) / nullif(sum(w.sample_count), 0)
               WHEN 'min' THEN min(w.value)
               WHEN 'max' THEN max(w.value)
               ELSE sum(w.value)
           END,
           sum(w.sample_count),
           count(*)
      FROM w
     WHERE w.period IS NOT NULL
     GROUP BY w.kpi, w.metric, w.kind, w.device_group, w.period
$$;

-- Rejections per reason for one experiment (all experiments when p_experiment is NULL).
CREATE OR REPLACE FUNCTION rejections_by_reason(p_experiment text)
RETURNS TABLE (reason text, rejections bigint, last_seen timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT r.reason, count(*), max(r.received_at)
      FROM rejections r
     WHERE p_experiment IS NULL OR r.experiment_id = p_experiment
     GROUP BY r.reason
     ORDER BY count(*) DESC, r.reason
$$;
