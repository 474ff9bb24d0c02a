-- Richer KPI kinds carry extra figures (impact: estimate, ci_low, ci_high, ...).
ALTER TABLE kpi_values ADD COLUMN details jsonb;

-- Device liveness transitions emitted by the streams worker (natural key: device, ts, status).
CREATE TABLE device_status (
    experiment_id text NOT NULL,
    device_id     text NOT NULL,
    status        text NOT NULL CHECK (status IN ('online', 'offline')),
    ts            timestamptz NOT NULL,
    last_seen     timestamptz,
    detail        text NOT NULL DEFAULT '',
    PRIMARY KEY (device_id, ts, status)
);
CREATE INDEX device_status_experiment_idx ON device_status (experiment_id, ts);

-- Readings that arrived too late to count in their KPI windows (routed by streams).
CREATE TABLE late_readings (
    ts            timestamptz NOT NULL,
    experiment_id text NOT NULL,
    device_id     text NOT NULL,
    device_group  text NOT NULL,
    metric        text NOT NULL,
    value         double precision NOT NULL,
    seq           bigint NOT NULL,
    received_at   timestamptz NOT NULL,
    PRIMARY KEY (device_id, metric, ts)
);
