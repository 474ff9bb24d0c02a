"""A scenario with every fault, through the whole real pipeline: the stored readings equal the
ground truth exactly (duplicates once, out-of-order and late ones included, skewed clocks as
sent), every expected rejection is recorded with its reason, and the true effect is recovered
from the streams worker's KPIs within ±0.03."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import psycopg
import pytest

from control.services import Services
from pilotlab import registry
from pilotlab.contracts import to_ms
from simulators.engine import MqttPool, send
from simulators.faults import Run
from simulators.runner import default_anchor
from simulators.spec import parse_scenario

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

SCENARIO = {
    "name": "it-faults",
    "seed": 5,
    "duration": "2d",  # whole days per period: the same nights before and after
    "speed": 8000,
    "experiments": [
        {
            "experiment": {
                "id": "sim-it-lighting",
                "title": "scenario integration test",
                "startup": "LumenSense",
                "district": "Borgo Po",
                "location": {"lat": 45.064, "lon": 7.70},
                "periods": {
                    "baseline": {"start": "2026-03-02T00:00:00Z", "end": "2026-03-02T12:00:00Z"},
                    "intervention": {"start": "2026-03-02T12:00:00Z", "end": "2026-03-03T00:00:00Z"},
                },
                "devices": [
                    {"id": "x", "kind": "street_light", "group": "treatment", "interval": "5m"},
                    {"id": "y", "kind": "street_light", "group": "control", "interval": "5m"},
                ],
                "kpis": [{"name": "energy_mean", "metric": "energy", "kind": "mean", "window": "1h"}],
            },
            "devices": {"treatment": 20, "control": 20},
            "true_effects": {"energy": -0.3},
        }
    ],
    "faults": {
        "dropout": {"rate": 0.02, "outages": [{"devices": 0.1, "start": "3h", "duration": "2h"}]},
        "duplicates": 0.02,
        "out_of_order": {"rate": 0.03, "max_delay": "10m"},
        "late": {"rate": 0.01, "delay": "2h"},
        "malformed": 0.01,
        "clock_skew": {"devices": 0.1, "offset": "10m"},
        "bursts": {"rate": 0.003, "size": 6},
    },
}


def period_means(conn: psycopg.Connection, exp) -> dict[tuple[str, str], float]:
    """Sample-weighted mean of the hourly energy_mean windows, per group and period."""
    rows = conn.execute(
        "SELECT device_group, window_start, value, sample_count FROM kpi_values"
        " WHERE experiment_id = %s AND kpi = 'energy_mean'",
        (exp.id,),
    ).fetchall()
    sums: Counter = Counter()
    counts: Counter = Counter()
    for group, start, value, n in rows:
        period = "baseline" if exp.periods.baseline.contains(start) else (
            "intervention" if exp.periods.intervention.contains(start) else None)
        if period and value is not None:
            sums[(group, period)] += value * n
            counts[(group, period)] += n
    return {k: sums[k] / counts[k] for k in counts}


def test_fault_scenario_matches_ground_truth_and_recovers_the_effect(stack_state, stack):
    scenario = parse_scenario(SCENARIO)
    anchor = default_anchor(scenario, scenario.speed, lead_s=5)
    run = Run(scenario, anchor)
    (exp,) = run.experiments
    registry.publish(stack_state.kafka_bootstrap, run.experiments)  # before the services start
    with Services(stack_state, stack.logs / "services-sim").start() as services:
        services.wait_ingest_ready()
        wall_start = anchor.timestamp() - run.wall_duration_s()
        import time  # noqa: PLC0415

        start = time.monotonic() + (wall_start - time.time())
        with MqttPool(stack_state.mqtt_url) as pool:
            stats = send(
                pool, ((run.wall_offset_s(m.send_ms), m.topic, m.payload) for m in run.messages()), start=start
            )
        truth = run.truth
        assert stats.max_lag_s * 1000 < run.lag_allowance_ms
        for fault in ("dropout", "outage", "duplicates", "out_of_order", "late", "malformed", "clock_skew", "bursts"):
            assert truth.faults[fault] > 0, f"the scenario should exercise {fault}"
        expected_rejections = truth.rejected_by_reason(exp.id)
        services.wait_drained(len(truth.stored), sum(expected_rejections.values()), experiment_ids=[exp.id],
                              timeout=240)

    with psycopg.connect(stack_state.database_url) as conn:
        rows = conn.execute(
            "SELECT device_id, metric, ts, value FROM readings WHERE experiment_id = %s", (exp.id,)
        ).fetchall()
        stored = {(d, m, to_ms(ts)): v for d, m, ts, v in rows}
        assert len(rows) == len(truth.stored)
        assert stored == truth.stored
        got = conn.execute(
            "SELECT rejection_id, reason FROM rejections WHERE experiment_id = %s", (exp.id,)
        ).fetchall()
        assert dict(got) == {k: str(reason) for k, (_e, reason) in truth.rejected.items()}
        means = period_means(conn, exp)
    did = (means[("treatment", "intervention")] / means[("treatment", "baseline")]) / (
        means[("control", "intervention")] / means[("control", "baseline")]
    ) - 1
    assert did == pytest.approx(truth.true_effects()[exp.id]["energy"], abs=0.03), means
