"""Proof of the dashboards without a Grafana server: a small pilot is replayed through the real
pipeline (MQTT → ingest → Kafka → streams → sink → PostgreSQL), then every panel's SQL and
every template variable query is interpolated as Grafana's PostgreSQL datasource does it and
run as the read-only ``grafana_reader`` role; each result must have rows with the columns its
panel type needs."""

from __future__ import annotations

import time
from datetime import timedelta

import psycopg
import pytest

from dashboards.build import build_all
from dashboards.checks import result_problems, targets
from dashboards.macros import interpolate
from dashboards.sdk import variable_query
from pilotlab import registry
from pilotlab.contracts import utcnow
from pilotlab.manifest import Experiment
from pilotlab.services import Services
from simulators.publisher import publish

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
                                   "AND details ? 'ci_low'", (exp.id,)).fetchone():
                assert time.monotonic() < deadline, "no impact KPI stored"
                time.sleep(0.5)
    _FILLED[key] = {"experiment": exp, "truth": truth, "filled_at": utcnow()}
    return _FILLED[key]


@pytest.fixture(scope="module")
def pilot(stack_state, stack):
    return filled_pilot(stack_state, stack)


@pytest.fixture(scope="module")
def reader(stack_state):
    url = stack_state.database_url.replace("postgresql://pilotlab@", "postgresql://grafana_reader@")
    with psycopg.connect(url, autocommit=True) as conn:
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
    for panel, target in targets(model):
        sql = interpolate(target["rawSql"], t_from, t_to, variables, timescaledb=timescaledb)
        assert "$" not in sql.replace("$$", ""), f"{panel['title']}: left uninterpolated: {sql}"
        cols, rows = _run(reader, sql)
        problems = result_problems(panel["type"], target["format"], cols, rows)
        assert not problems, f"{uid} / {panel['title']} ({panel['type']}): {problems}\n{sql}"
        checked += 1
    assert checked == len(model["panels"])


def test_panels_show_the_replayed_pilot(pilot, reader):
    """Spot checks of values, not only shapes: the impact panel shows the engine's estimate, the
    map shows every device, the rejections panel counts what the replay refused."""
    exp = pilot["experiment"]
    t_from, t_to = exp.periods.baseline.start - timedelta(hours=1), utcnow() + timedelta(minutes=5)
    panels = {p["title"]: p for p in build_all()["pilotlab-experiment"]["panels"]}
    v = {"experiment": EXPERIMENT_ID, "kpi": "no2_mean"}

    cols, rows = _run(reader, interpolate(panels["Impact with its 95% confidence interval"]["targets"][0]["rawSql"],
                                          t_from, t_to, v))
    est = reader.execute("SELECT (details->>'estimate')::float8 FROM kpi_values WHERE experiment_id = %s "
                         "AND kind = 'impact'", (EXPERIMENT_ID,)).fetchone()[0]
    row = dict(zip(cols, rows[0], strict=True))
    assert row["impact %"] == pytest.approx(100 * est)
    assert row["CI low %"] <= row["impact %"] <= row["CI high %"]

    cols, rows = _run(reader, interpolate(panels["Devices"]["targets"][0]["rawSql"], t_from, t_to, v))
    assert sorted(r[0] for r in rows) == sorted(d.id for d in exp.devices)

    health = {p["title"]: p for p in build_all()["pilotlab-device-health"]["panels"]}
    cols, rows = _run(reader, interpolate(health["Rejections by reason per device"]["targets"][0]["rawSql"],
                                          t_from, t_to, v))
    assert sum(r[cols.index("rejections")] for r in rows) == sum(pilot["truth"].rejected.values())
