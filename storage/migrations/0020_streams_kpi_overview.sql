-- Streams (issue 4): read functions for the richer KPI kinds.

-- Each windowed KPI folded over the baseline and the intervention period, per device group.
-- count/sum add up; mean is weighted by samples; min/max are the extremes; exceedance and
-- completeness are pooled from their details (exact); availability, quantile and freshness
-- are the average of their window values (a quantile of windows cannot be pooled exactly).
CREATE OR REPLACE FUNCTION streams_period_overview(p_experiment text)
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
         WHERE k.experiment_id = p_experiment AND k.kind <> 'impact'
    )
    SELECT w.kpi, w.metric, w.kind, w.device_group, w.period,
           CASE w.kind
               WHEN 'mean' THEN sum(w.value * w.sample_count) / nullif(sum(w.sample_count), 0)
               WHEN 'min' THEN min(w.value)
               WHEN 'max' THEN max(w.value)
               WHEN 'count' THEN sum(w.value)
               WHEN 'sum' THEN sum(w.value)
               WHEN 'exceedance' THEN sum((w.details->>'above')::double precision)
                                      / nullif(sum((w.details->>'samples')::double precision), 0)
               WHEN 'completeness' THEN sum((w.details->>'received')::double precision)
                                        / nullif(sum((w.details->>'expected')::double precision), 0)
               ELSE avg(w.value)
           END,
           sum(w.sample_count),
           count(*)
      FROM w
     WHERE w.period IS NOT NULL
     GROUP BY w.kpi, w.metric, w.kind, w.device_group, w.period
$$;

-- The impact KPIs of an experiment as streams last revised them: estimate and 95% CI in details.
CREATE OR REPLACE FUNCTION streams_impact(p_experiment text)
RETURNS TABLE (kpi text, metric text, value double precision, sample_count bigint,
               revision integer, details jsonb, updated_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT k.kpi, k.metric, k.value, k.sample_count, k.revision, k.details, k.updated_at
      FROM kpi_values k
     WHERE k.experiment_id = p_experiment AND k.kind = 'impact'
     ORDER BY k.kpi
$$;
