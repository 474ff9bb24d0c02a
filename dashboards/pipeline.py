"""*Pipeline operations*: throughput per stage, lag, and dead letters, read from the database.

Kafka consumer-group lag itself lives in Kafka, not in the database; what the database shows
is its effect: how long ago the newest reading was stored, and how far behind the devices'
clocks the pipeline runs (received_at − ts)."""

from __future__ import annotations

from grafana_foundation_sdk.builders import barchart, stat, table, timeseries

from dashboards.sdk import DATASOURCE, TIME_SERIES, SqlTarget, dashboard, grid, to_model

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
                SELECT extract(epoch FROM now() - (SELECT max(received_at) FROM readings)) AS "s since last stored",
                       (SELECT count(*) FROM rejections WHERE $__timeFilter(received_at)) AS "dead letters",
                       (SELECT count(*) FROM late_readings WHERE $__timeFilter(received_at)) AS "late readings"
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
                SELECT $__timeGroupAlias(t, $__interval), stage AS metric, count(*) AS "rows"
                  FROM (SELECT received_at AS t, 'datapoints stored' AS stage FROM readings
                         WHERE $__timeFilter(received_at)
                        UNION ALL
                        SELECT received_at, 'dead letters' FROM rejections WHERE $__timeFilter(received_at)
                        UNION ALL
                        SELECT received_at, 'late readings' FROM late_readings WHERE $__timeFilter(received_at)
                        UNION ALL
                        SELECT updated_at, 'KPI windows updated' FROM kpi_values WHERE $__timeFilter(updated_at)
                       ) s
                 GROUP BY 1, 2
                 ORDER BY 1
                """,
                TIME_SERIES,
            )
        )
        .grid_pos(grid(0, 5, 12, 8))
    )
    d.with_panel(
        timeseries.Panel()
        .title("Lag behind the devices (received_at − ts)")
        .description("Median and 95th percentile per interval. Replayed or simulated history shows its time shift.")
        .datasource(DATASOURCE)
        .with_target(
            SqlTarget(
                """
                SELECT $__timeGroupAlias(received_at, $__interval),
                       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM received_at - ts)) AS "p50 s",
                       percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM received_at - ts)) AS "p95 s"
                  FROM readings
                 WHERE $__timeFilter(received_at)
                 GROUP BY 1
                 ORDER BY 1
                """,
                TIME_SERIES,
            )
        )
        .unit("s")
        .grid_pos(grid(12, 5, 12, 8))
    )
    d.with_panel(
        barchart.Panel()
        .title("Dead letters by reason")
        .datasource(DATASOURCE)
        .with_target(
            SqlTarget("""
                SELECT reason, count(*) AS "dead letters"
                  FROM rejections
                 WHERE $__timeFilter(received_at)
                 GROUP BY reason
                 ORDER BY 2 DESC
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
                  FROM rejections
                 WHERE $__timeFilter(received_at)
                 ORDER BY received_at DESC
                 LIMIT 200
            """)
        )
        .grid_pos(grid(8, 13, 16, 9))
    )
    return to_model(d)
