-- Alerts (docs/alerts.md): the episodes the alerts service (streams/alerting.py) judged, their
-- deliveries, and the service's own state and Kafka positions, written in one transaction
-- per batch so that a restart resumes exactly where the last commit left off.

-- One row per episode: firing at fired_at, resolved (or still firing). The natural key is
-- (experiment, rule, subject, fired_at); alert_id is that key hashed (streams.alerts.alert_id).
CREATE TABLE alerts (
    alert_id          text PRIMARY KEY,
    experiment_id     text NOT NULL,
    rule              text NOT NULL,
    kind              text NOT NULL,
    severity          text NOT NULL CHECK (severity IN ('info', 'warning', 'critical')),
    subject           text NOT NULL,           -- a device id, or kpi:group
    device_id         text,                    -- device-level alerts only
    status            text NOT NULL CHECK (status IN ('firing', 'resolved')),
    fired_at          timestamptz NOT NULL,    -- event time
    resolved_at       timestamptz,             -- event time
    threshold         double precision,
    value             double precision,        -- when it fired
    resolved_value    double precision,
    summary           text NOT NULL,
    resolved_summary  text,
    stored_at         timestamptz NOT NULL DEFAULT now(),
    resolved_stored_at timestamptz,
    UNIQUE (experiment_id, rule, subject, fired_at),
    CHECK ((status = 'resolved') = (resolved_at IS NOT NULL))
);
-- at most one open episode per rule and subject: a second firing of what is firing is refused
CREATE UNIQUE INDEX alerts_one_firing ON alerts (experiment_id, rule, subject) WHERE status = 'firing';
CREATE INDEX alerts_experiment_time ON alerts (experiment_id, fired_at DESC);

-- One row per transition (firing or resolved) and target: the durable delivery queue.
-- target names the webhook (experiment:NAME or lab:NAME), the address or the MQTT topic; the
-- webhook's URL and secret are looked up in the configuration at each attempt, never stored.
CREATE TABLE alert_deliveries (
    delivery_id     text PRIMARY KEY,
    alert_id        text NOT NULL REFERENCES alerts (alert_id),
    event           text NOT NULL CHECK (event IN ('firing', 'resolved')),
    channel         text NOT NULL CHECK (channel IN ('webhook', 'email', 'mqtt')),
    target          text NOT NULL,
    payload         jsonb NOT NULL,
    status          text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    delivered_at    timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    history         jsonb NOT NULL DEFAULT '[]'   -- [{"at", "ok", "ms", "error"}], the last 20 attempts
);
CREATE INDEX alert_deliveries_due ON alert_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX alert_deliveries_alert ON alert_deliveries (alert_id);

-- The engine's state per experiment (streams.alerts, JSON) and the next Kafka offset of every
-- partition the service consumed, committed with the alerts they produced.
CREATE TABLE alert_state (
    experiment_id text PRIMARY KEY,
    state         jsonb NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE alert_offsets (
    topic       text NOT NULL,
    partition   integer NOT NULL,
    next_offset bigint NOT NULL,
    PRIMARY KEY (topic, partition)
);

-- Alerts with their deliveries summed up, newest first (dashboards, pilotlab, tests).
CREATE FUNCTION alert_history(p_experiment text DEFAULT NULL,
                              p_from timestamptz DEFAULT NULL, p_to timestamptz DEFAULT NULL)
RETURNS TABLE (alert_id text, experiment_id text, rule text, kind text, severity text, subject text,
               device_id text, status text, fired_at timestamptz, resolved_at timestamptz,
               threshold double precision, value double precision, summary text,
               resolved_summary text, deliveries bigint, delivered bigint, failed bigint, pending bigint)
LANGUAGE sql STABLE AS $$
    SELECT a.alert_id, a.experiment_id, a.rule, a.kind, a.severity, a.subject, a.device_id, a.status,
           a.fired_at, a.resolved_at, a.threshold, a.value, a.summary, a.resolved_summary,
           count(d.delivery_id),
           count(d.delivery_id) FILTER (WHERE d.status = 'delivered'),
           count(d.delivery_id) FILTER (WHERE d.status = 'failed'),
           count(d.delivery_id) FILTER (WHERE d.status = 'pending')
      FROM alerts a
      LEFT JOIN alert_deliveries d USING (alert_id)
     WHERE (p_experiment IS NULL OR a.experiment_id = p_experiment)
       AND (p_from IS NULL OR a.fired_at >= p_from)
       AND (p_to IS NULL OR a.fired_at < p_to)
     GROUP BY a.alert_id
     ORDER BY a.fired_at DESC, a.rule, a.subject
$$;

-- Privileges. The reader reads everything (0005/0022 also grant it by default; stated here
-- for databases migrated before those). The alerts service logs in as the sink's role,
-- pilotlab_writer (PILOTLAB_DATABASE_URL), which gets exactly what the service does: it never
-- deletes. Granted only where that role exists (storage/roles.sql makes it).
GRANT SELECT ON alerts, alert_deliveries, alert_state, alert_offsets TO grafana_reader;
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pilotlab_writer') THEN
        GRANT SELECT, INSERT, UPDATE ON alerts, alert_deliveries, alert_state, alert_offsets TO pilotlab_writer;
    END IF;
END
$$;
