-- Alerts on the read side (docs/alerts.md, docs/dashboards.md): what Grafana's alert panels and
-- the HTML report read. Invoker rights (no SECURITY DEFINER): row-level security on alerts
-- still decides which rows a role sees.

-- The alerts still firing (of one experiment, or all), most severe first, then oldest first.
CREATE FUNCTION open_alerts(p_experiment text DEFAULT NULL)
RETURNS TABLE (alert_id text, experiment_id text, rule text, kind text, severity text, subject text,
               device_id text, fired_at timestamptz, threshold double precision, value double precision,
               summary text, deliveries bigint, delivered bigint, failed bigint, pending bigint)
LANGUAGE sql STABLE AS $$
    SELECT h.alert_id, h.experiment_id, h.rule, h.kind, h.severity, h.subject, h.device_id, h.fired_at,
           h.threshold, h.value, h.summary, h.deliveries, h.delivered, h.failed, h.pending
      FROM alert_history(p_experiment) h
     WHERE h.status = 'firing'
     ORDER BY CASE h.severity WHEN 'critical' THEN 0 WHEN 'warning' THEN 1 ELSE 2 END, h.fired_at, h.rule,
              h.subject
$$;

-- Open alerts per experiment and severity (every experiment, with zeros).
CREATE FUNCTION open_alert_counts()
RETURNS TABLE (experiment_id text, title text, critical bigint, warning bigint, info bigint, open bigint,
               oldest_fired_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT e.experiment_id, e.title,
           count(a.alert_id) FILTER (WHERE a.severity = 'critical'),
           count(a.alert_id) FILTER (WHERE a.severity = 'warning'),
           count(a.alert_id) FILTER (WHERE a.severity = 'info'),
           count(a.alert_id),
           min(a.fired_at)
      FROM experiments e
      LEFT JOIN alerts a ON a.experiment_id = e.experiment_id AND a.status = 'firing'
     GROUP BY e.experiment_id, e.title
     ORDER BY count(a.alert_id) FILTER (WHERE a.severity = 'critical') DESC, count(a.alert_id) DESC, e.title
$$;

-- Every transition (firing, resolved) at its event time in [p_from, p_to) — of one experiment,
-- or all — newest first: an episode that fired and resolved gives two rows.
CREATE FUNCTION alert_transitions(p_experiment text DEFAULT NULL, p_from timestamptz DEFAULT NULL,
                                  p_to timestamptz DEFAULT NULL)
RETURNS TABLE (at timestamptz, event text, alert_id text, experiment_id text, rule text, kind text,
               severity text, subject text, device_id text, value double precision,
               threshold double precision, summary text, fired_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT t.at, t.event, a.alert_id, a.experiment_id, a.rule, a.kind, a.severity, a.subject, a.device_id,
           t.value, a.threshold, t.summary, a.fired_at
      FROM alerts a
     CROSS JOIN LATERAL (VALUES ('firing', a.fired_at, a.value, a.summary),
                                ('resolved', a.resolved_at, a.resolved_value, a.resolved_summary))
                        AS t (event, at, value, summary)
     WHERE t.at IS NOT NULL
       AND (p_experiment IS NULL OR a.experiment_id = p_experiment)
       AND (p_from IS NULL OR t.at >= p_from)
       AND (p_to IS NULL OR t.at < p_to)
     ORDER BY t.at DESC, t.event DESC, a.rule, a.subject
$$;

-- Transitions per time bucket and event (for a time series).
CREATE FUNCTION alert_transition_counts(p_experiment text, p_bucket interval, p_from timestamptz,
                                        p_to timestamptz)
RETURNS TABLE (bucket timestamptz, event text, transitions bigint)
LANGUAGE sql STABLE AS $$
    SELECT time_bucket(p_bucket, t.at) AS b, t.event, count(*)
      FROM alert_transitions(p_experiment, p_from, p_to) t
     GROUP BY b, t.event
     ORDER BY b, t.event
$$;

GRANT EXECUTE ON FUNCTION open_alerts(text), open_alert_counts(), alert_transitions(text, timestamptz, timestamptz),
    alert_transition_counts(text, interval, timestamptz, timestamptz), alert_history(text, timestamptz, timestamptz)
    TO grafana_reader;
