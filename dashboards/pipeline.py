"""*Pipeline operations*: throughput per stage, consumer lag per partition, freshness and dead letters.

Consumer lag comes from the services' Prometheus metrics (``pilotlab_streams_lag_records``,
``pilotlab_sink_lag_records``: true end offset − what the service has applied or stored, per
partition), scraped by the provisioned Prometheus; the rest is read from the database."""

from __future__ import annotations

from grafana_foundation_sdk.builders import barchart, stat, table, timeseries

from dashboards.sdk import DATASOURCE, PROMETHEUS, TIME_SERIES, SqlTarget, dashboard, grid, prom_target, to_model

UID = "pilotlab-pipeline"
TITLE = "PilotLab · Pipeline operations"


def build() -> dict:
    d = (
        dashboard(TITLE, UID, __doc__, "now-6h", refresh="30s")
    )
    d.with_panel(
        stat.Panel()
        .title("Freshness and dead letters")
        .description("Seconds since the newest stored reading arrived at ingest; dead letters and late readings "
                     "in the time range.")
        .datasource(DATASOURCE)
        .with_target(
            SqlTarget("""
                SELECT seconds_since_last_stored AS "s since last stored", rejections AS "dead letters",
                       late_readings AS "late readings"
                  FROM traffic_summary($__timeFrom(), $__timeTo())
            """)
        )
        .grid_pos(grid(0, 0, 24, 5))
    )
    d.with_panel(
        timeseries.Panel()
        .title("Throughput per stage")
        .description("Rows per interval: datapoints stored (ingest → sink), dead letters, late readings, "
                     "KPI window revisions stored (streams → sink).")
        .datasource(DATASOURCE)
        .with_target(
            SqlTarget(
                """
                SELECT bucket AS "time", stage AS metric, row_count AS "rows"
                  FROM pipeline_throughput($__interval_ms * INTERVAL '1 millisecond', $__timeFrom(), $__timeTo())
                 ORDER BY 1
                """,
                TIME_SERIES,
            )
        )
        .grid_pos(grid(0, 5, 12, 8))
    )
    d.with_panel(
        timeseries.Panel()
        .title("Consumer lag per partition (records)")
        .description("Records each consumer has not processed yet, per partition: the partition's true end "
                     "offset minus the streams worker's applied mark (streams) or the sink's stored position "
                     "(sink). Set by the services every 10 s (pilotlab_streams_lag_records, "
                     "pilotlab_sink_lag_records), scraped by Prometheus every 15 s.")
        .datasource(PROMETHEUS)
        .with_target(prom_target("max by (topic, partition) (pilotlab_streams_lag_records)",
                                 "streams {{topic}}[{{partition}}]", "A"))
        .with_target(prom_target("max by (topic, partition) (pilotlab_sink_lag_records)",
                                 "sink {{topic}}[{{partition}}]", "B"))
        .unit("short")
        .min(0)
        .grid_pos(grid(12, 5, 12, 8))
    )
    d.with_panel(
        barchart.Panel()
        .title("Dead letters by reason")
        .datasource(DATASOURCE)
        .with_target(
            SqlTarget("""
                SELECT reason, rejections AS "dead letters"
                  FROM rejections_by_reason(NULL, $__timeFrom(), $__timeTo())
            """)
        )
        .grid_pos(grid(0, 13, 8, 9))
    )
    d.with_panel(
        table.Panel()
        .title("Latest dead letters")
        .datasource(DATASOURCE)
        .with_target(
            SqlTarget("""
                SELECT received_at, reason, experiment_id, device_id, topic, detail
                  FROM latest_rejections(NULL, $__timeFrom(), $__timeTo(), 200)
            """)
        )
        .grid_pos(grid(8, 13, 16, 9))
    )
    return to_model(d)
