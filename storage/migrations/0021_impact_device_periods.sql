-- Impact planning and re-analysis: per device, the readings of one metric and their sum in
-- each half of the baseline ('b1', 'b2') and in the intervention ('i') — the state the
-- streams worker keeps for an impact KPI (streams/impact.py), aggregated from stored readings.
CREATE OR REPLACE FUNCTION impact_device_periods(p_experiment text, p_metric text)
RETURNS TABLE (device_id text, device_group text, cell text, readings bigint, total double precision)
LANGUAGE sql STABLE AS $$
    SELECT r.device_id, r.device_group,
           CASE WHEN r.ts >= e.intervention_start THEN 'i'
                WHEN r.ts < e.baseline_start + (e.baseline_end - e.baseline_start) / 2 THEN 'b1'
                ELSE 'b2' END AS cell,
           count(*), sum(r.value)
      FROM readings r
      JOIN experiments e USING (experiment_id)
     WHERE r.experiment_id = p_experiment AND r.metric = p_metric
       AND ((r.ts >= e.baseline_start AND r.ts < e.baseline_end)
            OR (r.ts >= e.intervention_start AND r.ts < e.intervention_end))
     GROUP BY 1, 2, 3
     ORDER BY 1, 3
$$;

-- kpi_impact (0006) divided group means of all readings: a reading-level ratio with no
-- interval, which disagreed with the streams worker's device-level impact. The impact of a
-- pilot is what streams stored (streams_impact, 0020), with its interval and verdict.
DROP FUNCTION IF EXISTS kpi_impact(text);
