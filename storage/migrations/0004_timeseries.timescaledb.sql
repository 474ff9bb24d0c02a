-- TimescaleDB mode: hypertables, compression, retention and continuous aggregates.
-- The tables keep their natural-key primary keys (each includes the time column), so the
-- sink's ON CONFLICT upserts work unchanged, also into compressed chunks.

SELECT create_hypertable('readings', by_range('ts', INTERVAL '1 day'), migrate_data => true);
SELECT create_hypertable('kpi_values', by_range('window_start', INTERVAL '7 days'), migrate_data => true);
SELECT create_hypertable('late_readings', by_range('ts', INTERVAL '7 days'), migrate_data => true);

-- Compression, segmented by device and metric: ingest refuses readings older than 7 days,
-- so chunks are complete (and compressed) after 8.
ALTER TABLE readings SET (
    timescaledb.compress,
    timescaledb.compress_segmentby = 'device_id, metric',
    timescaledb.compress_orderby = 'ts DESC'
);
SELECT add_compression_policy('readings', compress_after => INTERVAL '8 days');

ALTER TABLE kpi_values SET (
    timescaledb.compress,
    timescaledb.compress_segmentby = 'experiment_id, kpi, device_group',
    timescaledb.compress_orderby = 'window_size_s, window_start DESC'
);
SELECT add_compression_policy('kpi_values', compress_after => INTERVAL '30 days');

ALTER TABLE late_readings SET (
    timescaledb.compress,
    timescaledb.compress_segmentby = 'device_id, metric',
    timescaledb.compress_orderby = 'ts DESC'
);
SELECT add_compression_policy('late_readings', compress_after => INTERVAL '14 days');

-- Retention: raw samples for 400 days (a year-long pilot plus its report); the minute and
-- hour rollups and the KPI values are kept.
SELECT add_retention_policy('readings', drop_after => INTERVAL '400 days');
SELECT add_retention_policy('late_readings', drop_after => INTERVAL '90 days');

-- Rollups per device and metric. materialized_only = false: queries also see the newest,
-- not yet materialised buckets (real-time aggregation).
CREATE MATERIALIZED VIEW readings_1m
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT time_bucket(INTERVAL '1 minute', ts) AS bucket,
       device_id, metric, experiment_id, device_group,
       count(*) AS samples, sum(value) AS total, min(value) AS min_value, max(value) AS max_value
  FROM readings
 GROUP BY bucket, device_id, metric, experiment_id, device_group
WITH NO DATA;

CREATE MATERIALIZED VIEW readings_1h
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT time_bucket(INTERVAL '1 hour', ts) AS bucket,
       device_id, metric, experiment_id, device_group,
       count(*) AS samples, sum(value) AS total, min(value) AS min_value, max(value) AS max_value
  FROM readings
 GROUP BY bucket, device_id, metric, experiment_id, device_group
WITH NO DATA;

-- refresh what can still change: ingest accepts readings up to 7 days old
SELECT add_continuous_aggregate_policy('readings_1m',
    start_offset => INTERVAL '8 days', end_offset => INTERVAL '1 minute',
    schedule_interval => INTERVAL '1 minute');
SELECT add_continuous_aggregate_policy('readings_1h',
    start_offset => INTERVAL '8 days', end_offset => INTERVAL '1 hour',
    schedule_interval => INTERVAL '15 minutes');

-- retention is a background job here; the same call exists in plain-PostgreSQL mode
CREATE FUNCTION apply_retention() RETURNS bigint LANGUAGE sql AS $$ SELECT 0::bigint $$;
COMMENT ON FUNCTION apply_retention() IS
    'TimescaleDB mode: retention runs as policies (timescaledb_information.jobs); returns 0';
