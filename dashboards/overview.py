"""*City Lab overview*: every experiment with its devices online/offline, message rate,
rejection rate, headline KPI and impact, and its open alerts."""

from __future__ import annotations

from grafana_foundation_sdk.builders import barchart, stat, table, timeseries
from grafana_foundation_sdk.models import dashboard as model

from dashboards import impact_sql
from dashboards.sdk import (
    DATASOURCE,
    EVENT_COLOURS,
    TIME_SERIES,
    SqlTarget,
    dashboard,
    grid,
    to_model,
)

UID = "pilotlab-overview"
TITLE = "PilotLab · City Lab overview"


EXPERIMENTS_SQL = """
                SELECT o.title AS experiment, o.startup, o.district, o.devices, o.online, o.offline,
                       o.messages_per_min AS "messages/min",
                       o.rejection_rate AS "rejection rate %",
                       o.headline_kpi AS "headline KPI",
                       o.headline_details->>'verdict' AS verdict,
                       CASE WHEN o.headline_kpi IS NOT NULL THEN {impact} END AS impact,
                       {devices} AS "impact devices",
                       CASE WHEN o.headline_kpi IS NOT NULL THEN coalesce({warnings}, 'none') END AS warnings
                  FROM experiments_overview($__timeFrom(), $__timeTo()) o
                 ORDER BY o.title
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
                  FROM device_last_status(NULL) s
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
                SELECT datapoints AS "datapoints stored", rejections, experiments
                  FROM traffic_summary($__timeFrom(), $__timeTo())
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
                impact=_cont(impact_sql.estimate_with_interval("o.headline_details")),
                devices=_cont(impact_sql.devices("o.headline_details")),
                warnings=_cont(impact_sql.warnings("o.headline_details")),
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
                SELECT bucket AS "time", experiment_id AS metric, messages
                  FROM message_rate($__interval_ms * INTERVAL '1 millisecond', $__timeFrom(), $__timeTo())
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
                SELECT reason, rejections
                  FROM rejections_by_reason(NULL, $__timeFrom(), $__timeTo())
            """)
        )
        .grid_pos(grid(16, 13, 8, 8))
    )
    d.with_panel(
        table.Panel()
        .title("Open alerts per experiment")
        .description(
            "Alerts firing now, per experiment and severity (docs/alerts.md); firing since: the event time "
            "the oldest of them fired."
        )
        .datasource(DATASOURCE)
        .with_target(
            SqlTarget("""
                SELECT title AS experiment, critical, warning, info, open, oldest_fired_at AS "firing since"
                  FROM open_alert_counts()
            """)
        )
        .grid_pos(grid(0, 21, 10, 8))
    )
    d.with_panel(
        timeseries.Panel()
        .title("Alert transitions")
        .description("Alerts fired and resolved per interval, every experiment, at the event time of the transition.")
        .datasource(DATASOURCE)
        .with_target(
            SqlTarget(
                """
                SELECT bucket AS "time", event AS metric, transitions
                  FROM alert_transition_counts(NULL, $__interval_ms * INTERVAL '1 millisecond',
                                               $__timeFrom(), $__timeTo())
                 ORDER BY 1
                """,
                TIME_SERIES,
            )
        )
        .override_by_name("firing", [model.DynamicConfigValue("color", {"mode": "fixed",
                                                                        "fixedColor": EVENT_COLOURS["firing"]})])
        .override_by_name("resolved", [model.DynamicConfigValue("color", {"mode": "fixed",
                                                                          "fixedColor": EVENT_COLOURS["resolved"]})])
        .grid_pos(grid(10, 21, 14, 8))
    )
    return to_model(d)
