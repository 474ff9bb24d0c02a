-- Plain-PostgreSQL mode: the same names as the TimescaleDB mode, so the query layer and the
-- dashboards work unchanged. time_bucket() for intervals up to a week (TimescaleDB's
-- origin, a Monday), BRIN indexes on the time columns, plain views in place of the
-- continuous aggregates (computed on the fly), retention as a function to call.

CREATE FUNCTION time_bucket(bucket_width interval, ts timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT date_bin(bucket_width, ts, TIMESTAMPTZ '2000-01-03 00:00:00+00')
$$;

CREATE INDEX readings_ts_brin ON readings USING brin (ts);
CREATE INDEX kpi_values_window_start_brin ON kpi_values USING brin (window_start);
CREATE INDEX late_readings_ts_brin ON late_readings USING brin (ts);

CREATE VIEW readings_1m AS
SELECT time_bucket(INTERVAL '1 minute', ts) AS bucket,
       device_id, metric, experiment_id, device_group,
       count(*) AS samples, sum(value) AS total, min(value) AS min_value, max(value) AS max_value
  FROM readings
 GROUP BY 1, device_id, metric, experiment_id, device_group;

CREATE VIEW readings_1h AS
SELECT time_bucket(INTERVAL '1 hour', ts) AS bucket,
       device_id, metric, experiment_id, device_group,
       count(*) AS samples, sum(value) AS total, min(value) AS min_value, max(value) AS max_value
  FROM readings
 GROUP BY 1, device_id, metric, experiment_id, device_group;

-- Same windows as the TimescaleDB policies; run it from cron (SELECT apply_retention()).
CREATE FUNCTION apply_retention() RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
    m bigint;
BEGIN
    DELETE FROM readings WHERE ts < now() - INTERVAL '400 days';
    GET DIAGNOSTICS n = ROW_COUNT;
    DELETE FROM late_readings WHERE ts < now() - INTERVAL '90 days';
    GET DIAGNOSTICS m = ROW_COUNT;
    RETURN n + m;
END
$$;
COMMENT ON FUNCTION apply_retention() IS
    'Plain-PostgreSQL mode: deletes readings older than 400 days and late readings older than 90; returns rows deleted';
