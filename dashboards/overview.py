"""*City Lab overview*: every experiment with its devices online/offline, message rate,
rejection rate, headline KPI and impact."""

from __future__ import annotations

from grafana_foundation_sdk.builders import barchart, stat, table, timeseries

from dashboards import impact_sql
from dashboards.sdk import DATASOURCE, TIME_SERIES, SqlTarget, dashboard, grid, to_model

UID = "pilotlab-overview"
TITLE = "PilotLab · City Lab overview"


EXPERIMENTS_SQL = """
                WITH span AS (
                    SELECT greatest(extract(epoch FROM $__timeTo()::timestamptz - $__timeFrom()::timestamptz) / 60,
                                    1) AS minutes),
                msgs AS (
                    SELECT experiment_id, count(DISTINCT (device_id, ts)) AS n FROM readings
                     WHERE $__timeFilter(received_at) GROUP BY experiment_id),
                rej AS (
                    SELECT experiment_id, count(*) AS n FROM rejections
                     WHERE $__timeFilter(received_at) GROUP BY experiment_id),
                status AS (
                    SELECT d.experiment_id,
                           count(*) AS devices,
                           count(*) FILTER (WHERE s.status = 'online') AS online,
                           count(*) FILTER (WHERE s.status = 'offline') AS offline
                      FROM devices d
                      LEFT JOIN LATERAL (
                            SELECT status FROM device_status ds
                             WHERE ds.device_id = d.device_id ORDER BY ds.ts DESC LIMIT 1) s ON true
                     GROUP BY d.experiment_id),
                headline AS (
                    SELECT DISTINCT ON (experiment_id) experiment_id, kpi, details
                      FROM kpi_values WHERE kind = 'impact'
                     ORDER BY experiment_id, kpi)
                SELECT e.title AS experiment, e.startup, e.district,
                       coalesce(st.devices, 0) AS devices,
                       coalesce(st.online, 0) AS online,
                       coalesce(st.offline, 0) AS offline,
                       coalesce(m.n, 0) / span.minutes AS "messages/min",
                       100.0 * coalesce(r.n, 0) / nullif(coalesce(r.n, 0) + coalesce(m.n, 0), 0) AS "rejection rate %",
                       h.kpi AS "headline KPI",
                       h.details->>'verdict' AS verdict,
                       CASE WHEN h.kpi IS NOT NULL THEN {impact} END AS impact,
                       {devices} AS "impact devices",
                       CASE WHEN h.kpi IS NOT NULL THEN coalesce({warnings}, 'none') END AS warnings
                  FROM experiments e
                 CROSS JOIN span
                  LEFT JOIN status st USING (experiment_id)
                  LEFT JOIN msgs m USING (experiment_id)
                  LEFT JOIN rej r USING (experiment_id)
                  LEFT JOIN headline h USING (experiment_id)
                 ORDER BY e.title
            """


def _cont(sql: str, indent: int = 23) -> str:
    """A multi-line SQL expression placed in a column of the query: its continuation lines indented."""
    return sql.replace("\n", "\n" + " " * indent)


def build() -> dict:
    d = (
        dashboard(TITLE, UID, __doc__, "now-24h")
    )
    d.with_panel(
        stat.Panel()
        .title("Devices by status")
        .description("The last status the streams worker reported for each registered device.")
        .datasource(DATASOURCE)
        .with_target(
            SqlTarget("""
                SELECT count(*) FILTER (WHERE s.status = 'online') AS online,
                       count(*) FILTER (WHERE s.status = 'offline') AS offline,
                       count(*) FILTER (WHERE s.status IS NULL) AS "no status yet"
                  FROM devices d
                  LEFT JOIN LATERAL (
                        SELECT status FROM device_status ds
                         WHERE ds.device_id = d.device_id ORDER BY ds.ts DESC LIMIT 1) s ON true
            """)
        )
        .grid_pos(grid(0, 0, 12, 5))
    )
    d.with_panel(
        stat.Panel()
        .title("Traffic in the time range")
        .datasource(DATASOURCE)
        .with_target(
            SqlTarget("""
                SELECT (SELECT count(*) FROM readings WHERE $__timeFilter(received_at)) AS "datapoints stored",
                       (SELECT count(*) FROM rejections WHERE $__timeFilter(received_at)) AS rejections,
                       (SELECT count(*) FROM experiments) AS experiments
            """)
        )
        .grid_pos(grid(12, 0, 12, 5))
    )
    d.with_panel(
        table.Panel()
        .title("Experiments")
        .description(
            "Message rate: readings messages (device, instant) received per minute over the time range. "
            "Rejection rate: refused / (refused + accepted messages). Headline: the first impact KPI "
            "(device-level difference-in-differences vs control, or before/after without a control group) "
            "with its verdict, its estimate and 95% CI (a relative change in %, or a difference in the "
            "metric's unit for metrics without a true zero), its devices per group and its warnings."
        )
        .datasource(DATASOURCE)
        .with_target(
            SqlTarget(EXPERIMENTS_SQL.format(
                impact=_cont(impact_sql.estimate_with_interval("h.details")),
                devices=_cont(impact_sql.devices("h.details")),
                warnings=_cont(impact_sql.warnings("h.details")),
            ))
        )
        .decimals(1)
        .override_by_name("verdict", impact_sql.verdict_column())
        .override_by_name("warnings", impact_sql.long_text_column())
        .grid_pos(grid(0, 5, 24, 8))
    )
    d.with_panel(
        timeseries.Panel()
        .title("Message rate per experiment")
        .description("Readings messages (device, instant) received by ingest per interval.")
        .datasource(DATASOURCE)
        .with_target(
            SqlTarget(
                """
                SELECT $__timeGroupAlias(received_at, $__interval), experiment_id AS metric,
                       count(DISTINCT (device_id, ts)) AS messages
                  FROM readings
                 WHERE $__timeFilter(received_at)
                 GROUP BY 1, 2
                 ORDER BY 1
                """,
                TIME_SERIES,
            )
        )
        .grid_pos(grid(0, 13, 16, 8))
    )
    d.with_panel(
        barchart.Panel()
        .title("Rejections by reason")
        .datasource(DATASOURCE)
        .with_target(
            SqlTarget("""
                SELECT reason, count(*) AS rejections
                  FROM rejections
                 WHERE $__timeFilter(received_at)
                 GROUP BY reason
                 ORDER BY 2 DESC
            """)
        )
        .grid_pos(grid(16, 13, 8, 8))
    )
    return to_model(d)
