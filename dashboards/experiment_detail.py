"""*Experiment detail*: one experiment (``$experiment``) and one of its KPIs (``$kpi``): the KPI
series per group, baseline vs intervention, treatment vs control, the difference-in-differences
estimate with its 95% CI (as the streams engine last revised it), a map of the devices and the
data completeness."""

from __future__ import annotations

from grafana_foundation_sdk.builders import barchart, common, geomap, stat, table, timeseries
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models import geomap as gmodel

from dashboards.sdk import (
    DATASOURCE,
    TIME_SERIES,
    SqlTarget,
    all_values,
    dashboard,
    device_markers,
    experiment_variable,
    grid,
    to_model,
)

UID = "pilotlab-experiment"
TITLE = "PilotLab · Experiment detail"


def kpi_variable() -> dash.QueryVariable:
    return (
        dash.QueryVariable("kpi")
        .label("KPI")
        .datasource(DATASOURCE)
        .query(
            "SELECT DISTINCT kpi FROM kpi_values "
            "WHERE experiment_id = '$experiment' AND kind <> 'impact' ORDER BY kpi"
        )
        .refresh(model.VariableRefresh.ON_DASHBOARD_LOAD)
    )


def build() -> dict:
    d = (
        dashboard(TITLE, UID, __doc__, "now-30d")
        .with_variable(experiment_variable())
        .with_variable(kpi_variable())
    )
    d.with_panel(
        stat.Panel()
        .title("Impact (difference-in-differences)")
        .description("Relative effect of the intervention on each impact KPI, corrected by the control group.")
        .datasource(DATASOURCE)
        .with_target(
            SqlTarget("""
                SELECT kpi, 100 * (details->>'estimate')::float8 AS "impact %"
                  FROM streams_impact('$experiment')
                 ORDER BY kpi
            """)
        )
        .unit("percent")
        .decimals(1)
        .reduce_options(all_values())
        .grid_pos(grid(0, 0, 8, 6))
    )
    d.with_panel(
        table.Panel()
        .title("Impact with its 95% confidence interval")
        .datasource(DATASOURCE)
        .with_target(
            SqlTarget("""
                SELECT kpi, metric,
                       100 * (details->>'estimate')::float8 AS "impact %",
                       100 * (details->>'ci_low')::float8 AS "CI low %",
                       100 * (details->>'ci_high')::float8 AS "CI high %",
                       details->>'method' AS method,
                       sample_count AS samples, revision, updated_at
                  FROM streams_impact('$experiment')
                 ORDER BY kpi
            """)
        )
        .decimals(1)
        .grid_pos(grid(8, 0, 16, 6))
    )
    d.with_panel(
        timeseries.Panel()
        .title("$kpi: treatment vs control")
        .description("The KPI's event-time windows per device group (current revision of each window).")
        .datasource(DATASOURCE)
        .with_target(
            SqlTarget(
                """
                SELECT window_start AS "time", device_group AS metric, value
                  FROM kpi_series('$experiment', '$kpi', $__timeFrom(), $__timeTo())
                 ORDER BY 1
                """,
                TIME_SERIES,
            )
        )
        .grid_pos(grid(0, 6, 16, 9))
    )
    d.with_panel(
        barchart.Panel()
        .title("$kpi: baseline vs intervention")
        .description("Each period folded per group: means weighted by samples, counts and sums added.")
        .datasource(DATASOURCE)
        .with_target(
            SqlTarget("""
                SELECT device_group, baseline, intervention
                  FROM kpi_baseline_vs_intervention('$experiment')
                 WHERE kpi = '$kpi'
                 ORDER BY device_group DESC
            """)
        )
        .grid_pos(grid(16, 6, 8, 9))
    )
    d.with_panel(
        table.Panel()
        .title("Treatment vs control per period")
        .datasource(DATASOURCE)
        .with_target(
            SqlTarget("""
                SELECT kpi, period, treatment, control, difference, 100 * ratio AS "treatment/control - 1 %"
                  FROM kpi_treatment_vs_control('$experiment')
                 ORDER BY kpi, period
            """)
        )
        .decimals(3)
        .grid_pos(grid(0, 15, 12, 9))
    )
    d.with_panel(
        geomap.Panel()
        .title("Devices")
        .description("Treatment and control devices with their status and completeness.")
        .datasource(DATASOURCE)
        .with_target(
            SqlTarget("""
                SELECT d.device_id, d.device_group, d.kind, d.lat AS latitude, d.lon AS longitude,
                       coalesce(h.status, 'no status yet') AS status, 100 * h.completeness AS "completeness %"
                  FROM devices d
                  JOIN device_health('$experiment', $__timeFrom(), $__timeTo()) h USING (device_id)
                 WHERE d.experiment_id = '$experiment' AND d.lat IS NOT NULL
            """)
        )
        .view(geomap.MapViewConfig().id("fit").zoom(15))
        .basemap(common.MapLayerOptions().type("default").name("Basemap"))
        .layers(device_markers())
        .tooltip(geomap.TooltipOptions().mode(gmodel.TooltipMode.DETAILS))
        .grid_pos(grid(12, 15, 12, 9))
    )
    d.with_panel(
        timeseries.Panel()
        .title("Completeness per group (hourly)")
        .description("Samples received / samples expected from each device's sampling interval.")
        .datasource(DATASOURCE)
        .with_target(
            SqlTarget(
                """
                WITH per AS (
                    SELECT bucket, device_id, max(samples) AS samples
                      FROM readings_1h
                     WHERE experiment_id = '$experiment' AND $__timeFilter(bucket)
                     GROUP BY 1, 2),
                     b AS (SELECT DISTINCT bucket FROM per)
                SELECT b.bucket AS "time", d.device_group AS metric,
                       100.0 * coalesce(sum(per.samples), 0) / sum(3600.0 / d.interval_s) AS "completeness %"
                  FROM b
                 CROSS JOIN devices d
                  LEFT JOIN per ON per.bucket = b.bucket AND per.device_id = d.device_id
                 WHERE d.experiment_id = '$experiment'
                 GROUP BY 1, 2
                 ORDER BY 1
                """,
                TIME_SERIES,
            )
        )
        .unit("percent")
        .min(0)
        .grid_pos(grid(0, 24, 24, 8))
    )
    return to_model(d)

