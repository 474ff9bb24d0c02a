-- pilotlab core schema. Natural keys make every write idempotent: a message delivered twice
-- by Kafka (at-least-once) is stored once.

CREATE TABLE experiments (
    experiment_id      text PRIMARY KEY,
    title              text NOT NULL,
    startup            text NOT NULL,
    district           text NOT NULL,
    lat                double precision NOT NULL,
    lon                double precision NOT NULL,
    baseline_start     timestamptz NOT NULL,
    baseline_end       timestamptz NOT NULL,
    intervention_start timestamptz NOT NULL,
    intervention_end   timestamptz NOT NULL,
    manifest           jsonb NOT NULL,
    updated_at         timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE devices (
    device_id     text PRIMARY KEY,
    experiment_id text NOT NULL REFERENCES experiments (experiment_id) ON DELETE CASCADE,
    kind          text NOT NULL,
    device_group  text NOT NULL CHECK (device_group IN ('treatment', 'control')),
    interval_s    integer NOT NULL CHECK (interval_s > 0),
    lat           double precision,
    lon           double precision
);
CREATE INDEX devices_experiment_idx ON devices (experiment_id);

-- one row per device, metric and instant
CREATE TABLE readings (
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
CREATE INDEX readings_experiment_metric_ts_idx ON readings (experiment_id, metric, ts);

-- one row per KPI, device group and event-time window; the highest revision wins
CREATE TABLE kpi_values (
    experiment_id  text NOT NULL,
    kpi            text NOT NULL,
    metric         text NOT NULL,
    kind           text NOT NULL,
    device_group   text NOT NULL,
    window_size_s  integer NOT NULL,
    window_start   timestamptz NOT NULL,
    window_end     timestamptz NOT NULL,
    value          double precision,
    sample_count   bigint NOT NULL,
    revision       integer NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (experiment_id, kpi, device_group, window_size_s, window_start)
);
CREATE INDEX kpi_values_window_idx ON kpi_values (experiment_id, window_start);

-- refused messages and batch items, with the reason code the startup was sent
CREATE TABLE rejections (
    rejection_id  text PRIMARY KEY,
    received_at   timestamptz NOT NULL,
    reason        text NOT NULL,
    detail        text NOT NULL,
    topic         text NOT NULL,
    experiment_id text,
    device_id     text,
    item_index    integer,
    excerpt       text NOT NULL DEFAULT ''
);
CREATE INDEX rejections_experiment_idx ON rejections (experiment_id, received_at);
