"""The read side's query layer on the real database, read as ``grafana_reader``: the period
summary folds each KPI kind as the registry says (windows made by the kinds' own aggregators
and stored by the sink's writer), the SQL table of kinds is the registry, the reader may
execute every function of the layer, and the alert functions, panels and report show the
pilot's alerts as the alerts service stored them."""

from __future__ import annotations

import random
import statistics
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from dashboards.build import build_all
from dashboards.macros import interpolate
from dashboards.report import load, render
from pilotlab.contracts import KpiValue, to_ms, utcnow
from pilotlab.kpi_kinds import KINDS, WINDOWED
from pilotlab.manifest import Experiment
from storage import queries
from storage.writer import write_experiments, write_kpis
from streams import kpis
from tests.integration.test_dashboards_sql import EXPERIMENT_ID, filled_pilot, pilot_alerts

pytestmark = pytest.mark.integration

KINDS_EXP = "ql-kinds"
T0 = datetime(2026, 1, 5, tzinfo=UTC)
WINDOW = 600
PARAMS = {"quantile": {"q": 0.9}, "exceedance": {"threshold": 30.0}}


def kinds_experiment() -> Experiment:
    return Experiment.model_validate({
        "id": KINDS_EXP, "title": "Query layer kinds", "startup": "TestCo", "district": "Centro",
        "location": {"lat": 45.0, "lon": 7.6},
        "periods": {"baseline": {"start": T0.isoformat(), "end": (T0 + timedelta(hours=1)).isoformat()},
                    "intervention": {"start": (T0 + timedelta(hours=1)).isoformat(),
                                     "end": (T0 + timedelta(hours=2)).isoformat()}},
        "devices": [{"id": "qlk-t1", "kind": "air_quality", "group": "treatment", "interval": "1m"},
                    {"id": "qlk-t2", "kind": "air_quality", "group": "treatment", "interval": "2m"},
                    {"id": "qlk-c1", "kind": "air_quality", "group": "control", "interval": "1m"}],
        "kpis": [{"name": f"pm25_{k}", "metric": "pm25", "kind": k, "window": "10m", **PARAMS.get(k, {})}
                 for k in WINDOWED],
    })  # fmt: skip


def windows_of(exp: Experiment) -> tuple[list[KpiValue], dict[tuple[str, str, str], list]]:
    """Every windowed KPI's windows over plain lists of values, each window folded by the kind's
    own aggregator; and per (kpi, group, period) the window states (to merge)."""
    rnd = random.Random(11)
    values, states = [], {}
    for kpi in exp.kpis:
        agg = kpis.make(kpi, exp)
        for w in range(12):  # 6 windows of 10 minutes per period, a window with no sample now and then
            start_ms = to_ms(T0) + w * WINDOW * 1000
            for group in ("treatment", "control"):
                devices = [d for d in exp.devices if d.group == group]
                state = agg.initialize()
                n = 0
                for i in range(rnd.choice([0, 3, 8, 15])):
                    d = devices[i % len(devices)]
                    ts = start_ms + rnd.randrange(WINDOW * 1000)
                    obs = kpis.Obs(rnd.uniform(5, 60), ts, d.id, group, ts + rnd.randrange(0, 90_000))
                    state, n = agg.add(state, obs), n + 1
                if n == 0:
                    continue
                value, details = agg.result(state, group)
                values.append(KpiValue(exp.id, kpi.name, kpi.metric, kpi.kind, group, WINDOW, start_ms, value, n, 1,
                                       details))  # fmt: skip
                period = "baseline" if w < 6 else "intervention"
                states.setdefault((kpi.name, group, period), []).append((state, value, n, details))
    return values, states


@pytest.fixture(scope="module")
def kinds(stack_state):
    exp = kinds_experiment()
    values, states = windows_of(exp)
    with psycopg.connect(stack_state.database_url) as conn:  # the sink's role and write path
        write_experiments(conn, [exp])
        write_kpis(conn, values)
    return exp, states


@pytest.fixture(scope="module")
def reader(stack_state):
    with psycopg.connect(stack_state.reader_url, autocommit=True) as conn:
        yield conn


def test_the_sql_kinds_table_is_the_registry(reader):
    rows = reader.execute("SELECT kind, period_fold, numerator, denominator FROM kpi_kinds").fetchall()
    assert {r[0]: tuple(r[1:]) for r in rows} == {
        name: (k.period_fold, *(k.pooled or (None, None))) for name, k in KINDS.items()
    }


def python_fold(kind: str, windows: list) -> float | None:
    """A period's windows folded by the registry's rule, in Python."""
    spec = KINDS[kind]
    vals = [v for _, v, _, _ in windows if v is not None]
    if spec.period_fold == "sum":
        return sum(vals)
    if spec.period_fold == "weighted_mean":
        return sum(v * n for _, v, n, _ in windows) / sum(n for _, _, n, _ in windows)
    if spec.period_fold in ("min", "max"):
        return {"min": min, "max": max}[spec.period_fold](vals)
    if spec.period_fold == "pooled":
        num, den = spec.pooled
        return sum(d[num] for *_, d in windows) / sum(d[den] for *_, d in windows)
    return statistics.fmean(vals)


def test_the_period_summary_folds_each_kind_as_the_registry_says(kinds, reader):
    exp, states = kinds
    summary = queries.kpi_period_summary(reader, KINDS_EXP)
    assert all(isinstance(s, queries.PeriodValue) for s in summary)
    got = {(s.kpi, s.device_group, s.period): s for s in summary}
    assert set(got) == set(states)  # every windowed kind, both groups and periods; no impact
    assert {s.kind for s in summary} == set(WINDOWED)
    for key, windows in states.items():
        s = got[key]
        assert (s.sample_count, s.windows) == (sum(n for _, _, n, _ in windows), len(windows)), key
        assert s.value == pytest.approx(python_fold(s.kind, windows), rel=1e-12), key
        # the exact folds are the kind's own aggregator over every observation of the period
        if KINDS[s.kind].period_fold in ("sum", "weighted_mean", "min", "max") or s.kind == "exceedance":
            agg = kpis.make(next(k for k in exp.kpis if k.name == s.kpi), exp)
            merged = agg.initialize()
            for state, *_ in windows:
                merged = agg.merge(merged, state)
            assert s.value == pytest.approx(agg.result(merged, key[1])[0], rel=1e-9), key


def test_the_reader_executes_every_function_of_the_read_side(reader):
    rows = reader.execute(
        """SELECT p.proname, has_function_privilege('grafana_reader', p.oid, 'EXECUTE'), p.prosecdef
             FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace AND p.proname = ANY(%s)""",
        ([
            "kpi_period_summary", "experiment_kpis", "experiment_list", "experiment_info", "device_last_status",
            "experiments_overview", "traffic_summary", "message_rate", "pipeline_throughput", "rejections_by_reason",
            "device_rejections", "latest_rejections", "device_samples_hourly", "group_completeness_hourly",
            "open_alerts", "open_alert_counts", "alert_transitions", "alert_transition_counts",
        ],),
    ).fetchall()
    assert len(rows) == 18
    assert [name for name, ok, _ in rows if not ok] == []
    assert [name for name, _, definer in rows if definer] == []  # invoker rights: row-level security applies


# --- alerts --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pilot(stack_state, stack):
    return filled_pilot(stack_state, stack)


def test_alert_functions_show_what_the_alerts_service_stored(pilot, reader):
    exp = pilot["experiment"]
    stored = pilot_alerts(exp)
    open_now = queries.open_alerts(reader, EXPERIMENT_ID)
    assert [(a.severity, a.rule, a.subject) for a in open_now] == [
        ("critical", "offline", "dash-c2"),
        ("warning", "no2_high", "no2_mean:treatment"),
    ]  # most severe first
    assert open_now[1].value == 48.5 and open_now[1].threshold == 40.0 and open_now[1].device_id is None
    history = queries.alert_transitions(reader, EXPERIMENT_ID)
    assert [(t.event, t.subject, to_ms(t.at)) for t in history] == sorted(
        ((t.status, t.subject, t.at_ms) for t in stored), key=lambda x: -x[2]
    )
    resolved = next(t for t in history if t.event == "resolved")
    assert resolved.summary == "dash-t1 reporting again" and to_ms(resolved.fired_at) == stored[0].fired_at_ms
    assert len(queries.alert_transitions(reader, EXPERIMENT_ID, limit=2)) == 2
    mine = next(r for r in reader.execute("SELECT * FROM open_alert_counts()").fetchall() if r[0] == EXPERIMENT_ID)
    assert mine[2:6] == (1, 1, 0, 2)


def test_alert_panels_show_the_pilots_alerts(pilot, reader):
    exp = pilot["experiment"]
    t_from, t_to = exp.periods.baseline.start - timedelta(hours=1), utcnow() + timedelta(minutes=5)
    v = {"experiment": EXPERIMENT_ID, "kpi": "no2_mean"}

    def rows(uid: str, title: str) -> list[dict]:
        panel = next(p for p in build_all()[uid]["panels"] if p["title"] == title)
        cur = reader.execute(interpolate(panel["targets"][0]["rawSql"], t_from, t_to, v))
        cols = [c.name for c in cur.description]
        return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]

    per_exp = next(r for r in rows("pilotlab-overview", "Open alerts per experiment") if r["experiment"] == exp.title)
    assert (per_exp["critical"], per_exp["warning"], per_exp["open"]) == (1, 1, 2)
    counts = rows("pilotlab-overview", "Alert transitions")
    assert sum(r["transitions"] for r in counts if r["metric"] == "firing") >= 3
    assert sum(r["transitions"] for r in counts if r["metric"] == "resolved") >= 1
    assert [r["subject"] for r in rows("pilotlab-experiment", "Open alerts")] == ["dash-c2", "no2_mean:treatment"]
    history = rows("pilotlab-experiment", "Alert history")
    assert [(r["event"], r["subject"]) for r in history] == [
        ("firing", "dash-c2"), ("resolved", "dash-t1"), ("firing", "dash-t1"), ("firing", "no2_mean:treatment"),
    ]  # fmt: skip


def test_the_report_shows_open_alerts_and_their_history(pilot, reader):
    data = load(reader, EXPERIMENT_ID)
    assert [a.subject for a in data.open_alerts] == ["dash-c2", "no2_mean:treatment"]
    assert [t.event for t in data.alert_history] == ["firing", "resolved", "firing", "firing"]
    section = render(data).split("<h2>Alerts</h2>")[1].split("<h2>Rejections</h2>")[0]
    assert "<b>2</b> alerts firing (1 critical, 1 warning)" in section
    assert "dash-c2 silent for 6 expected intervals of 60 s" in section
    assert "no2_mean (treatment) 48.5 above 40" in section and "dash-t1 reporting again" in section
