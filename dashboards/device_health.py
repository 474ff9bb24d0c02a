"""*Startup device health*: per device of ``$experiment``, when it was last seen, its
status, its completeness and its rejections by reason, so that a startup can fix its devices."""

from __future__ import annotations

from grafana_foundation_sdk.builders import barchart, table, timeseries

from dashboards.sdk import (
    DATASOURCE,
    DEVICE_STATUS_SQL,
    TIME_SERIES,
    SqlTarget,
    dashboard,
    experiment_variable,
    grid,
    to_model,
)

UID = "pilotlab-device-health"
TITLE = "PilotLab · Startup device health"


def build() -> dict:
    d = (
        dashboard(TITLE, UID, __doc__, "now-30d")
        .with_variable(experiment_variable())
    )
    d.with_panel(
        table.Panel()
        .title("Devices")
        .description(
            "Completeness = distinct sample instants / instants expected from the device's interval over the "
            "time range. Status: the last the streams worker reported (online from the first reading, offline when "
            "silent, online when back); never reported: no reading yet."
        )
        .datasource(DATASOURCE)
        .with_target(
            SqlTarget(f"""
                SELECT h.device_id, h.device_group, h.kind, h.interval_s,
                       h.last_seen,
                       {DEVICE_STATUS_SQL} AS status,
                       h.status_since,
                       h.samples, h.expected, 100 * h.completeness AS "completeness %",
                       coalesce(r.rejections, 0) AS rejections
                  FROM device_health('$experiment', $__timeFrom(), $__timeTo()) h
                  LEFT JOIN (SELECT device_id, sum(rejections)::bigint AS rejections
                               FROM device_rejections('$experiment', $__timeFrom(), $__timeTo())
                              GROUP BY device_id) r USING (device_id)
                 ORDER BY "completeness %" NULLS FIRST, h.device_id
            """)
        )
        .decimals(1)
        .grid_pos(grid(0, 0, 24, 9))
    )
    d.with_panel(
        barchart.Panel()
        .title("Completeness per device")
        .datasource(DATASOURCE)
        .with_target(
            SqlTarget("""
                SELECT device_id, 100 * completeness AS "completeness %"
                  FROM device_health('$experiment', $__timeFrom(), $__timeTo())
                 ORDER BY device_id
            """)
        )
        .unit("percent")
        .min(0)
        .max(100)
        .grid_pos(grid(0, 9, 12, 8))
    )
    d.with_panel(
        table.Panel()
        .title("Rejections by reason per device")
        .description("What each device sent that was refused, with the latest detail the device was told.")
        .datasource(DATASOURCE)
        .with_target(
            SqlTarget("""
                SELECT device_id, reason, rejections, last_seen, latest_detail
                  FROM device_rejections('$experiment', $__timeFrom(), $__timeTo())
            """)
        )
        .grid_pos(grid(12, 9, 12, 8))
    )
    d.with_panel(
        timeseries.Panel()
        .title("Rejections over time by reason")
        .datasource(DATASOURCE)
        .with_target(
            SqlTarget(
                """
                SELECT bucket AS "time", reason AS metric, rejections
                  FROM rejections_timeline('$experiment', $__interval_ms * INTERVAL '1 millisecond',
                                           $__timeFrom(), $__timeTo())
                 ORDER BY 1
                """,
                TIME_SERIES,
            )
        )
        .grid_pos(grid(0, 17, 12, 8))
    )
    d.with_panel(
        timeseries.Panel()
        .title("Samples per device (hourly, event time)")
        .datasource(DATASOURCE)
        .with_target(
            SqlTarget(
                """
                SELECT bucket AS "time", device_id AS metric, samples
                  FROM device_samples_hourly('$experiment', $__timeFrom(), $__timeTo())
                 ORDER BY 1
                """,
                TIME_SERIES,
            )
        )
        .grid_pos(grid(12, 17, 12, 8))
    )
    return to_model(d)
