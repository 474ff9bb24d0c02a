"""*Experiment detail*: one experiment (``$experiment``) and one of its KPIs (``$kpi``): the KPI
series per group, baseline vs intervention, treatment vs control, the impact of each impact KPI
as the streams engine last revised it (verdict, estimate with its 95% CI in its scale, devices
per group, design, method, placebo check and warnings), a map of the devices and the data
completeness, its open alerts and their history."""

from __future__ import annotations

from grafana_foundation_sdk.builders import barchart, common, geomap, stat, table, timeseries
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.models import common as cmodel
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models import geomap as gmodel

from dashboards import impact_sql
from dashboards.sdk import (
    DATASOURCE,
    DEVICE_STATUS_SQL,
    EVENT_COLOURS,
    SEVERITY_COLOURS,
    TIME_SERIES,
    SqlTarget,
    all_values,
    coloured_column,
    dashboard,
    device_markers,
    experiment_variable,
    grid,
    to_model,
)

UID = "pilotlab-experiment"
TITLE = "PilotLab · Experiment detail"


IMPACT_STAT_SQL = f"""
    SELECT kpi || ': ' || {impact_sql.estimate_with_interval()} || ' · ' || {impact_sql.devices()} AS impact,
           coalesce(details->>'verdict', 'inconclusive') AS verdict
      FROM streams_impact('$experiment')
     ORDER BY kpi
"""

IMPACT_TABLE_SQL = f"""
    SELECT kpi, metric,
           details->>'verdict' AS verdict,
           {impact_sql.number('estimate')} AS estimate,
           {impact_sql.number('ci_low')} AS "CI low",
           {impact_sql.number('ci_high')} AS "CI high",
           {impact_sql.unit()} AS unit,
           (details->'devices'->>'treatment')::int AS "treatment devices",
           (details->'devices'->>'control')::int AS "control devices",
           details->>'design' AS design,
           CASE WHEN (details->>'final')::boolean THEN 'final' ELSE 'interim' END AS status,
           {impact_sql.placebo()} AS placebo,
           (details->>'p_value')::float8 AS "p-value",
           details->>'method' AS method,
           sample_count AS samples, revision, updated_at
      FROM streams_impact('$experiment')
     ORDER BY kpi
"""

IMPACT_WARNINGS_SQL = f"""
    SELECT i.kpi, i.details->>'verdict' AS verdict, coalesce(c.code, '—') AS code,
           coalesce(w.sentence, c.code, 'none') AS warning
      FROM streams_impact('$experiment') i
      LEFT JOIN LATERAL jsonb_array_elements_text(i.details->'warnings') WITH ORDINALITY AS c(code, n) ON true
      LEFT JOIN {impact_sql.warning_sentences_table()} ON w.code = c.code
     ORDER BY i.kpi, c.n
"""


def kpi_variable() -> dash.QueryVariable:
    return (
        dash.QueryVariable("kpi")
        .label("KPI")
        .datasource(DATASOURCE)
        .query(
            "SELECT kpi FROM experiment_kpis('$experiment')"
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
        .title("Impact verdict")
        .description(
            "The verdict of each impact KPI as the streams engine last revised it: improved, worsened, "
            "no clear effect (the 95% CI includes zero) or inconclusive (the design cannot carry a verdict: "
            "see the warnings). Named by the KPI, its estimate with the 95% CI in its scale (a relative change "
            "in %, or a difference in the metric's unit) and the devices analysed per group."
        )
        .datasource(DATASOURCE)
        .with_target(SqlTarget(IMPACT_STAT_SQL))
        .reduce_options(all_values().fields("/^verdict$/"))
        .mappings(impact_sql.verdict_mappings())
        .color_mode(cmodel.BigValueColorMode.BACKGROUND)
        .graph_mode(cmodel.BigValueGraphMode.NONE)
        .text_mode(cmodel.BigValueTextMode.VALUE_AND_NAME)
        .orientation(cmodel.VizOrientation.HORIZONTAL)
        .grid_pos(grid(0, 0, 24, 4))
    )
    d.with_panel(
        table.Panel()
        .title("Impact with its 95% confidence interval")
        .description(
            "Device-level difference-in-differences (treatment minus control change of each device's period "
            "mean; before/after without a control group). estimate, CI low and CI high are in the unit column: "
            "% for a relative change, the metric's unit for a difference (metrics without a true zero, e.g. "
            "degC, dB(A)). Placebo: the baseline's second half against its first, which should show no effect."
        )
        .datasource(DATASOURCE)
        .with_target(SqlTarget(IMPACT_TABLE_SQL))
        .decimals(2)
        .override_by_name("verdict", impact_sql.verdict_column())
        .override_by_name("p-value", [model.DynamicConfigValue("decimals", 3)])
        .override_by_name("method", impact_sql.long_text_column())
        .grid_pos(grid(0, 4, 24, 6))
    )
    d.with_panel(
        table.Panel()
        .title("Impact warnings")
        .description("Every reason a verdict is withheld or weakened, per impact KPI (none: no warning).")
        .datasource(DATASOURCE)
        .with_target(SqlTarget(IMPACT_WARNINGS_SQL))
        .override_by_name("verdict", impact_sql.verdict_column())
        .override_by_name("warning", impact_sql.long_text_column())
        .grid_pos(grid(0, 10, 24, 5))
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
        .grid_pos(grid(0, 15, 16, 9))
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
        .grid_pos(grid(16, 15, 8, 9))
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
        .grid_pos(grid(0, 24, 12, 9))
    )
    d.with_panel(
        geomap.Panel()
        .title("Devices")
        .description("Treatment and control devices with their status and completeness.")
        .datasource(DATASOURCE)
        .with_target(
            SqlTarget(f"""
                SELECT d.device_id, d.device_group, d.kind, d.latitude, d.longitude,
                       {DEVICE_STATUS_SQL} AS status,
                       100 * h.completeness AS "completeness %"
                  FROM device_last_status('$experiment') d
                  JOIN device_health('$experiment', $__timeFrom(), $__timeTo()) h USING (device_id)
                 WHERE d.latitude IS NOT NULL
            """)
        )
        .view(geomap.MapViewConfig().id("fit").zoom(15))
        .basemap(common.MapLayerOptions().type("default").name("Basemap"))
        .layers(device_markers())
        .tooltip(geomap.TooltipOptions().mode(gmodel.TooltipMode.DETAILS))
        .grid_pos(grid(12, 24, 12, 9))
    )
    d.with_panel(
        timeseries.Panel()
        .title("Completeness per group (hourly)")
        .description("Samples received / samples expected from each device's sampling interval.")
        .datasource(DATASOURCE)
        .with_target(
            SqlTarget(
                """
                SELECT bucket AS "time", device_group AS metric, 100 * completeness AS "completeness %"
                  FROM group_completeness_hourly('$experiment', $__timeFrom(), $__timeTo())
                 ORDER BY 1
                """,
                TIME_SERIES,
            )
        )
        .unit("percent")
        .min(0)
        .grid_pos(grid(0, 33, 24, 8))
    )
    d.with_panel(
        table.Panel()
        .title("Open alerts")
        .description(
            "The experiment's alerts firing now (docs/alerts.md): most severe first, then oldest; value: what "
            "fired it, against the rule's threshold; deliveries: webhook, e-mail and MQTT sends of its transitions."
        )
        .datasource(DATASOURCE)
        .with_target(
            SqlTarget("""
                SELECT severity, rule, kind, subject, fired_at AS "firing since", value, threshold, summary,
                       delivered, failed, pending
                  FROM open_alerts('$experiment')
            """)
        )
        .override_by_name("severity", coloured_column(SEVERITY_COLOURS))
        .override_by_name("summary", impact_sql.long_text_column())
        .grid_pos(grid(0, 41, 24, 6))
    )
    d.with_panel(
        table.Panel()
        .title("Alert history")
        .description("Every alert transition of the experiment in the time range, newest first: fired or "
                     "resolved, at the event time the rule judged.")
        .datasource(DATASOURCE)
        .with_target(
            SqlTarget("""
                SELECT at AS "time", event, severity, rule, subject, value, threshold, summary
                  FROM alert_transitions('$experiment', $__timeFrom(), $__timeTo())
                 LIMIT 500
            """)
        )
        .override_by_name("event", coloured_column(EVENT_COLOURS))
        .override_by_name("severity", coloured_column(SEVERITY_COLOURS))
        .override_by_name("summary", impact_sql.long_text_column())
        .grid_pos(grid(0, 47, 24, 9))
    )
    return to_model(d)

