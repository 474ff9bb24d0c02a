"""Proof of the dashboards without a Grafana server: a small pilot is replayed through the real
pipeline (MQTT → ingest → Kafka → streams → sink → PostgreSQL), then every panel's SQL and
every template variable query is interpolated as Grafana's PostgreSQL datasource does it and
run as the read-only ``grafana_reader`` role; each result must have rows with the columns its
panel type needs."""

from __future__ import annotations

import json
import time
from datetime import timedelta

import psycopg
import pytest

from control.services import Services
from dashboards import impact_sql, impact_text
from dashboards.build import build_all
from dashboards.checks import result_problems, sql_targets, stat_fields
from dashboards.macros import interpolate
from dashboards.sdk import variable_query
from pilotlab import registry
from pilotlab.contracts import to_ms, utcnow
from pilotlab.manifest import Experiment
from simulators.publisher import publish
from streams.alert_store import record_transitions
from streams.alerts import Transition

pytestmark = pytest.mark.integration

EXPERIMENT_ID = "dash-pilot"
_FILLED: dict[str, dict] = {}


def dashboard_experiment() -> Experiment:
    now = utcnow().replace(second=0, microsecond=0)
    start, mid = now - timedelta(hours=3), now - timedelta(minutes=90)
    devices = [
        {"id": f"dash-{g[0]}{i}", "kind": "air_quality", "group": g, "interval": "1m",
         "location": {"lat": 45.05 + i / 1000, "lon": 7.68 + (0.01 if g == "control" else 0)}}
        for g in ("treatment", "control") for i in (1, 2, 3)
    ]
    return Experiment.model_validate({
        "id": EXPERIMENT_ID, "title": "Dashboards test pilot", "startup": "TestCo", "district": "Centro",
        "location": {"lat": 45.05, "lon": 7.68},
        "periods": {"baseline": {"start": start.isoformat(), "end": mid.isoformat()},
                    "intervention": {"start": mid.isoformat(), "end": now.isoformat()}},
        "devices": devices,
        "kpis": [
            {"name": "no2_mean", "metric": "no2", "kind": "mean", "window": "5m"},
            {"name": "no2_completeness", "metric": "no2", "kind": "completeness", "window": "15m"},
            {"name": "no2_impact", "metric": "no2", "kind": "impact"},
        ],
        "simulation": {"true_effects": {"no2": -0.2}, "bad_message_rate": 0.05},
    })


def pilot_alerts(exp: Experiment) -> list[Transition]:
    """Alert transitions of the pilot, as the alerts service judges and stores them (its judging:
    test_alerts): a device offline that came back, one still offline, a KPI above its limit."""
    b0, i0 = to_ms(exp.periods.baseline.start), to_ms(exp.periods.intervention.start)
    minute = 60_000

    def t(rule, kind, severity, subject, status, fired, at, value, threshold, summary):  # noqa: PLR0917
        device = None if ":" in subject else subject
        return Transition(exp.id, rule, kind, severity, subject, device, status, fired, at, value, threshold, summary)

    return [
        t("offline", "device_offline", "critical", "dash-t1", "firing", b0 + 30 * minute, b0 + 30 * minute, 360.0,
          None, "dash-t1 silent for 6 expected intervals of 60 s"),
        t("offline", "device_offline", "critical", "dash-t1", "resolved", b0 + 30 * minute, b0 + 50 * minute, None,
          None, "dash-t1 reporting again"),
        t("no2_high", "kpi_above", "warning", "no2_mean:treatment", "firing", b0 + 20 * minute, b0 + 20 * minute, 48.5,
          40.0, "no2_mean (treatment) 48.5 above 40"),
        t("offline", "device_offline", "critical", "dash-c2", "firing", i0 + 10 * minute, i0 + 10 * minute, 360.0,
          None, "dash-c2 silent for 6 expected intervals of 60 s"),
    ]  # fmt: skip


def filled_pilot(stack_state, stack) -> dict:
    """Replay the pilot once per stack (the report tests reuse it when they share a stack)."""
    key = str(stack.data_dir)
    if key in _FILLED:
        return _FILLED[key]
    exp = dashboard_experiment()
    registry.publish(stack_state.kafka_bootstrap, [exp])
    with Services(stack_state, stack.logs / "services-dashboards").start() as services:
        services.wait_ingest_ready()
        truth = publish(stack_state.mqtt_url, [exp], seed=5, duration_s=4, batch=3)
        assert sum(truth.rejected.values()) > 0, "the replay should include refused payloads"
        services.wait_drained(len(truth.accepted), sum(truth.rejected.values()), experiment_ids=[exp.id],
                              timeout=180)
        deadline = time.monotonic() + 90  # the impact KPI is revised right after the last readings
        with psycopg.connect(stack_state.database_url, autocommit=True) as conn:
            while not conn.execute("SELECT 1 FROM kpi_values WHERE experiment_id = %s AND kind = 'impact' "
                                   "AND details->>'ci_low' IS NOT NULL AND (details->>'final')::boolean",
                                   (exp.id,)).fetchone():
                assert time.monotonic() < deadline, "no impact KPI stored"
                time.sleep(0.5)
    with psycopg.connect(stack_state.database_url) as conn:  # the alerts service's role and write path
        record_transitions(conn, pilot_alerts(exp))
    _FILLED[key] = {"experiment": exp, "truth": truth, "filled_at": utcnow()}
    return _FILLED[key]


@pytest.fixture(scope="module")
def pilot(stack_state, stack):
    return filled_pilot(stack_state, stack)


@pytest.fixture(scope="module")
def reader(stack_state):
    with psycopg.connect(stack_state.reader_url, autocommit=True) as conn:
        assert conn.execute("SHOW default_transaction_read_only").fetchone()[0] == "on"
        yield conn


def _run(conn, sql):
    cur = conn.execute(sql)
    return [c.name for c in cur.description], cur.fetchall()


@pytest.mark.parametrize("timescaledb", [True, False], ids=["timescaledb-switch-on", "switch-off"])
@pytest.mark.parametrize("uid", ["pilotlab-overview", "pilotlab-experiment", "pilotlab-device-health",
                                 "pilotlab-pipeline"])
def test_every_panel_query_feeds_its_panel(pilot, reader, uid, timescaledb):
    exp = pilot["experiment"]
    t_from = exp.periods.baseline.start - timedelta(hours=1)
    t_to = utcnow() + timedelta(minutes=5)  # received_at is the replay's wall clock
    model = build_all()[uid]

    variables: dict[str, str] = {}
    for var in model.get("templating", {}).get("list", []):
        sql = interpolate(variable_query(var), t_from, t_to, variables, timescaledb=timescaledb)
        cols, rows = _run(reader, sql)
        values = [r[cols.index("__value")] if "__value" in cols else r[0] for r in rows]
        assert values, f"variable {var['name']} has no options"
        if var["name"] == "experiment":
            assert EXPERIMENT_ID in values
            variables["experiment"] = EXPERIMENT_ID
        else:
            variables[var["name"]] = "no2_mean" if "no2_mean" in values else values[0]

    checked = 0
    for panel, target in sql_targets(model):  # the PromQL ones: test_service_metrics
        sql = interpolate(target["rawSql"], t_from, t_to, variables, timescaledb=timescaledb)
        assert "$" not in sql.replace("$$", ""), f"{panel['title']}: left uninterpolated: {sql}"
        cols, rows = _run(reader, sql)
        problems = result_problems(panel["type"], target["format"], cols, rows, fields=stat_fields(panel))
        assert not problems, f"{uid} / {panel['title']} ({panel['type']}): {problems}\n{sql}"
        checked += 1
    assert checked == len({id(p) for p, _ in sql_targets(model)})


def test_panels_show_the_replayed_pilot(pilot, reader):
    """Spot checks of values, not only shapes: the impact panels show the engine's estimate,
    verdict, devices and warnings, the map shows every device, the rejections panel counts what
    the replay refused."""
    exp = pilot["experiment"]
    t_from, t_to = exp.periods.baseline.start - timedelta(hours=1), utcnow() + timedelta(minutes=5)
    panels = {p["title"]: p for p in build_all()["pilotlab-experiment"]["panels"]}
    v = {"experiment": EXPERIMENT_ID, "kpi": "no2_mean"}

    def panel_rows(panel: dict) -> list[dict]:
        cols, rows = _run(reader, interpolate(panel["targets"][0]["rawSql"], t_from, t_to, v))
        return [dict(zip(cols, r, strict=True)) for r in rows]

    details = reader.execute("SELECT details FROM kpi_values WHERE experiment_id = %s AND kind = 'impact'",
                             (EXPERIMENT_ID,)).fetchone()[0]
    assert details["scale"] == "relative"  # no2: a ratio-scale metric
    assert details["verdict"] in impact_text.VERDICTS

    (row,) = panel_rows(panels["Impact with its 95% confidence interval"])
    assert row["estimate"] == pytest.approx(100 * details["estimate"]) and row["unit"] == "%"
    assert row["CI low"] <= row["estimate"] <= row["CI high"]
    assert row["verdict"] == details["verdict"]
    assert (row["treatment devices"], row["control devices"]) == (details["devices"]["treatment"],
                                                                   details["devices"]["control"]) == (3, 3)
    assert row["design"] == "difference-in-differences" and row["method"] == details["method"]

    (stat,) = panel_rows(panels["Impact verdict"])
    assert stat["verdict"] == details["verdict"]
    assert stat["impact"] == f"no2_impact: {impact_text.estimate_with_interval(details)} · 3 vs 3 devices"

    warnings = panel_rows(panels["Impact warnings"])
    assert [w["code"] for w in warnings] == (details["warnings"] or ["—"])
    assert [w["warning"] for w in warnings] == (impact_text.sentences(details["warnings"]) or ["none"])
    assert "short_period" in details["warnings"]  # 90-minute periods: no verdict
    assert details["verdict"] == "inconclusive"

    overview = {p["title"]: p for p in build_all()["pilotlab-overview"]["panels"]}["Experiments"]
    cols, rows = _run(reader, interpolate(overview["targets"][0]["rawSql"], t_from, t_to, {}))
    mine = dict(zip(cols, next(r for r in rows if r[0] == exp.title), strict=True))
    assert mine["verdict"] == details["verdict"] and mine["headline KPI"] == "no2_impact"
    assert mine["impact devices"] == "3 vs 3 devices"
    assert mine["impact"] == impact_text.estimate_with_interval(details)
    assert mine["warnings"] == ("; ".join(impact_text.sentences(details["warnings"])) or "none")

    cols, rows = _run(reader, interpolate(panels["Devices"]["targets"][0]["rawSql"], t_from, t_to, v))
    assert sorted(r[0] for r in rows) == sorted(d.id for d in exp.devices)

    health = {p["title"]: p for p in build_all()["pilotlab-device-health"]["panels"]}
    cols, rows = _run(reader, interpolate(health["Rejections by reason per device"]["targets"][0]["rawSql"],
                                          t_from, t_to, v))
    assert sum(r[cols.index("rejections")] for r in rows) == sum(pilot["truth"].rejected.values())


@pytest.mark.parametrize("details", [
    {"estimate": 1.02, "ci_low": 0.4, "ci_high": 1.64, "scale": "absolute", "unit": "degC", "verdict": "worsened",
     "warnings": ["few_devices"], "devices": {"treatment": 2, "control": 3}, "design": "difference-in-differences",
     "placebo": {"estimate": 0.05, "ci_low": -0.1, "ci_high": 0.2}},
    {"estimate": -2.1, "ci_low": -3.4, "ci_high": -0.8, "scale": "absolute", "unit": "dB(A)", "verdict": "improved",
     "warnings": [], "devices": {"treatment": 6, "control": 6}, "design": "difference-in-differences",
     "placebo": None},
    {"estimate": 0.121, "ci_low": 0.114, "ci_high": 0.128, "scale": "relative", "unit": None,
     "verdict": "inconclusive", "warnings": ["no_control_group", "relative_undefined"],
     "devices": {"treatment": 8, "control": 0}, "design": "before-after",
     "placebo": {"estimate": 0.001, "ci_low": -0.004, "ci_high": 0.006}},
    {"estimate": None, "ci_low": None, "ci_high": None, "scale": "relative", "unit": None, "verdict": "inconclusive",
     "warnings": ["no_data"], "devices": {"treatment": 0, "control": 0}, "design": "difference-in-differences",
     "placebo": None},
], ids=["degC", "dBA", "before-after", "no-data"])
def test_impact_sql_formats_by_scale(reader, details):
    """The panels' SQL pieces on stored details of each kind, in PostgreSQL: an absolute estimate
    is a difference in its unit (never × 100 as %), and the text matches the report's."""
    cols = {
        "text": impact_sql.estimate_with_interval(), "number": impact_sql.number("estimate"),
        "unit": impact_sql.unit(), "devices": impact_sql.devices(), "warnings": impact_sql.warnings(),
        "placebo": impact_sql.placebo(),
    }
    sql = ", ".join(f"{expr} AS {name}" for name, expr in cols.items()).replace("%", "%%")
    row = dict(zip(cols, reader.execute(f"SELECT {sql} FROM (VALUES (%s::jsonb)) AS t(details)",
                                        (json.dumps(details),)).fetchone(), strict=True))
    absolute = details["scale"] == "absolute"
    if details["estimate"] is None:
        assert row["text"] == "—" and row["number"] is None
    else:
        assert row["number"] == pytest.approx(details["estimate"] * (1 if absolute else 100))
        digits = 2 if absolute else None  # the SQL writes absolute effects with two decimals
        assert row["text"] == impact_text.estimate_with_interval(details, digits=digits)
    assert row["unit"] == (details["unit"] if absolute else "%")
    if absolute:
        assert details["unit"] in row["text"] and "%" not in row["text"].replace("95% CI", "")
    assert row["devices"] == impact_text.devices(details["devices"], details["design"])
    assert row["warnings"] == ("; ".join(impact_text.sentences(details["warnings"])) or None)
    if details["placebo"] is None:
        assert row["placebo"] == "—"
    else:
        p = {**details["placebo"], "scale": details["scale"], "unit": details["unit"]}
        assert row["placebo"] == impact_text.estimate_with_interval(p, digits=2 if absolute else None)
