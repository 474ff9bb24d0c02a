"""The KPI engine on the real broker (MQTT → ingest → tansu → Faust → sink → PostgreSQL).

* every KPI kind from the pipeline equals a batch recomputation over the stored raw readings
  (exact for count/sum/mean/min/max and the shares, within the sketch's bound for quantiles
  and freshness; the impact from the same cells recomputed with numpy, and its CI covers the
  simulation's true effect);
* late and out-of-order readings: within lateness they revise, past it they are routed to
  ``pilotlab.late``; a silent device is reported offline and back online;
* two workers share the partitions, and killing one mid-stream then restarting it gives the
  same KPIs as the batch recomputation (no double counting after changelog recovery).
"""

from __future__ import annotations

import math
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from datetime import timedelta

import numpy as np
import orjson
import psycopg
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from control.services import Services
from control.stack import free_port
from pilotlab import registry
from pilotlab.contracts import DeviceStatus, KafkaTopics, ReadingBatch, telemetry_topic, to_ms, utcnow
from pilotlab.manifest import Experiment
from simulators.publisher import publish
from streams.engine import window_start
from streams.impact import estimate_impact
from streams.kpis import SKETCH_ALPHA
from tests.integration.test_end_to_end import publish_raw

pytestmark = pytest.mark.integration

ALL_KINDS_KPIS = [
    {"name": "no2_count", "metric": "no2", "kind": "count", "window": "5m"},
    {"name": "no2_sum", "metric": "no2", "kind": "sum", "window": "5m"},
    {"name": "no2_mean", "metric": "no2", "kind": "mean", "window": "5m"},
    {"name": "no2_min", "metric": "no2", "kind": "min", "window": "5m"},
    {"name": "no2_max", "metric": "no2", "kind": "max", "window": "5m"},
    {"name": "no2_p50", "metric": "no2", "kind": "quantile", "q": 0.5, "window": "15m"},
    {"name": "no2_p95", "metric": "no2", "kind": "quantile", "q": 0.95, "window": "15m"},
    {"name": "pm25_over", "metric": "pm25", "kind": "exceedance", "threshold": 15, "window": "15m"},
    {"name": "no2_avail", "metric": "no2", "kind": "availability", "window": "5m"},
    {"name": "no2_complete", "metric": "no2", "kind": "completeness", "window": "15m"},
    {"name": "no2_fresh", "metric": "no2", "kind": "freshness", "window": "15m"},
    {"name": "no2_impact", "metric": "no2", "kind": "impact"},
]


def experiment(exp_id: str, prefix: str, minutes: int, kpis: list[dict], **extra) -> Experiment:
    now = utcnow().replace(second=0, microsecond=0)
    start, mid = now - timedelta(minutes=minutes), now - timedelta(minutes=minutes // 2)
    devices = [
        {"id": f"{prefix}-{g[0]}{i}", "kind": "air_quality", "group": g, "interval": "1m"}
        for g in ("treatment", "control")
        for i in (1, 2, 3)
    ]
    return Experiment.model_validate(
        {
            "id": exp_id,
            "title": f"test {exp_id}",
            "startup": "TestCo",
            "district": "Centro",
            "location": {"lat": 45.07, "lon": 7.68},
            "periods": {
                "baseline": {"start": start.isoformat(), "end": mid.isoformat()},
                "intervention": {"start": mid.isoformat(), "end": now.isoformat()},
            },
            "devices": devices,
            "kpis": kpis,
            "simulation": {"true_effects": {"no2": -0.2}, "bad_message_rate": 0.0},
            **extra,
        }
    )


def raw_readings(conn: psycopg.Connection, exp_id: str) -> list[tuple]:
    return conn.execute(
        "SELECT device_id, device_group, metric, value, ts, received_at FROM readings WHERE experiment_id = %s",
        (exp_id,),
    ).fetchall()


def stored(conn: psycopg.Connection, exp_id: str) -> dict[tuple, tuple]:
    rows = conn.execute(
        "SELECT kpi, device_group, window_start, value, sample_count, details FROM kpi_values "
        "WHERE experiment_id = %s",
        (exp_id,),
    ).fetchall()
    return {(k, g, to_ms(ws)): (v, n, d) for k, g, ws, v, n, d in rows}


def rank_value(values: list[float], q: float) -> float:
    return sorted(values)[math.floor(q * (len(values) - 1))]


def recompute(exp: Experiment, rows: list[tuple]) -> dict[tuple, dict]:
    """Batch recomputation from stored readings, with numpy/statistics (not the aggregators):
    key → {"value", "n", "bound"} where bound is the allowed absolute difference."""
    registered = defaultdict(int)
    expected_per_s = defaultdict(float)
    for d in exp.devices:
        registered[d.group] += 1
        expected_per_s[d.group] += 1 / d.interval
    cells: dict[tuple, list[tuple]] = defaultdict(list)
    for device, group, metric, value, ts, received in rows:
        ts_ms = to_ms(ts)
        for k in exp.kpis:
            if k.metric != metric or k.kind == "impact":
                continue
            cells[(k.name, group, window_start(ts_ms, k.window))].append(
                (value, device, max(0, to_ms(received) - ts_ms) / 1000)
            )
    kpis = {k.name: k for k in exp.kpis}
    out = {}
    for key, obs in cells.items():
        k = kpis[key[0]]
        vals = [o[0] for o in obs]
        bound = 1e-9 * max(1.0, *(abs(v) for v in vals)) * len(vals)
        if k.kind == "count":
            value = float(len(vals))
        elif k.kind == "sum":
            value = math.fsum(vals)
        elif k.kind == "mean":
            value = statistics.fmean(vals)
        elif k.kind == "min":
            value = min(vals)
        elif k.kind == "max":
            value = max(vals)
        elif k.kind == "quantile":
            value = rank_value(vals, k.q)
            bound = SKETCH_ALPHA * abs(value)
        elif k.kind == "freshness":
            value = rank_value([o[2] for o in obs], 0.95)
            bound = SKETCH_ALPHA * abs(value)
        elif k.kind == "exceedance":
            value = float(np.mean(np.array(vals) > k.threshold))
        elif k.kind == "availability":
            value = len({o[1] for o in obs}) / registered[key[1]]
        elif k.kind == "completeness":
            value = len(vals) / (expected_per_s[key[1]] * k.window)
        out[key] = {"value": value, "n": len(vals), "bound": bound}
    return out


def recompute_impact(exp: Experiment, rows: list[tuple], metric: str):
    """streams.impact.estimate_impact on the readings storage holds: the worker must have
    stored exactly this."""
    readings = [(device, to_ms(ts), value) for device, _group, m, value, ts, _rec in rows if m == metric]
    return estimate_impact(exp, f"{metric}_impact", readings)


def wait_for(check, timeout: float, conn: psycopg.Connection | None = None, what: str = ""):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is True:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: {result}")
        time.sleep(0.5)
        if conn is not None:
            conn.commit()  # a fresh snapshot on the next read


def kpis_match(conn: psycopg.Connection, exp: Experiment):
    def check():
        rows = raw_readings(conn, exp.id)
        want = recompute(exp, rows)
        got = stored(conn, exp.id)
        got_windowed = {k: v for k, v in got.items() if k[1] != "all"}
        if got_windowed.keys() != want.keys():
            missing, extra = len(want.keys() - got_windowed.keys()), len(got_windowed.keys() - want.keys())
            return f"{missing} windows missing, {extra} extra"
        bad = [
            (k, got_windowed[k][:2], (w["value"], w["n"]))
            for k, w in want.items()
            if got_windowed[k][1] != w["n"] or abs(got_windowed[k][0] - w["value"]) > w["bound"] + 1e-12
        ]
        return True if not bad else f"{len(bad)} of {len(want)} windows differ, e.g. {bad[:3]}"

    return check


def test_every_kind_equals_a_batch_recomputation_and_impact_covers_the_truth(stack_state, stack):
    exp = experiment("streams-kinds", "sk", minutes=240, kpis=ALL_KINDS_KPIS)
    registry.publish(stack_state.kafka_bootstrap, [exp])
    with Services(stack_state, stack.logs / "services-streams-kinds").start() as services:
        services.wait_ingest_ready()
        truth = publish(stack_state.mqtt_url, [exp], seed=21, duration_s=4, batch=2)
        services.wait_drained(len(truth.accepted), 0, experiment_ids=[exp.id], timeout=180)
        with psycopg.connect(stack_state.database_url) as conn:
            wait_for(kpis_match(conn, exp), 90, conn, "windowed KPIs vs batch recomputation")

            def impact_matches():
                rows = raw_readings(conn, exp.id)
                want = recompute_impact(exp, rows, "no2").as_dict()
                got = stored(conn, exp.id).get(("no2_impact", "all", to_ms(exp.periods.baseline.start)))
                if got is None or got[2]["readings"] != want["readings"]:
                    return f"impact readings {got and got[2]['readings']} vs {want['readings']}"
                for field in ("estimate", "ci_low", "ci_high", "se", "df", "p_value"):
                    assert got[2][field] == pytest.approx(want[field], rel=1e-6), field
                for field in ("verdict", "warnings", "devices", "scale", "unit", "method", "design", "final"):
                    assert got[2][field] == want[field], field
                assert got[0] == pytest.approx(want["estimate"], rel=1e-6)
                return True

            wait_for(impact_matches, 60, conn, "impact vs recomputation")
            value, n, details = stored(conn, exp.id)[("no2_impact", "all", to_ms(exp.periods.baseline.start))]
            # three devices a group: the interval (t, 4 df) covers the true effect, the estimate inside it
            assert details["ci_low"] <= -0.2 <= details["ci_high"], details
            assert details["ci_low"] < value < details["ci_high"], details
            assert n == sum(c for g in details["readings"].values() for c in g.values())
            assert details["devices"] == {"treatment": 3, "control": 3}
            # a four-hour pilot: an estimate and an interval, but no verdict on so short a period
            assert details["verdict"] == "inconclusive" and "short_period" in details["warnings"]


# --- late and out-of-order --------------------------------------------------------------------


def read_topic(bootstrap: str, topic: str, experiment_id: str, decode, *, want: int, timeout: float = 60):
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "test-unused", "enable.auto.commit": False,
                         "enable.partition.eof": False})  # fmt: skip
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        found = []
        deadline = time.monotonic() + timeout
        while len(found) < want and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or (msg.error() and msg.error().code() == KafkaError._PARTITION_EOF):
                continue
            assert msg.error() is None, msg.error()
            if msg.key() == experiment_id.encode():
                found.append(decode(msg.value()))
        return found
    finally:
        consumer.close()


def test_late_out_of_order_and_liveness(stack_state, stack):
    kpis = [
        {"name": "no2_mean", "metric": "no2", "kind": "mean", "window": "1m"},
        {"name": "no2_p95", "metric": "no2", "kind": "quantile", "q": 0.95, "window": "5m"},
    ]
    exp = experiment("streams-late", "sl", minutes=60, kpis=kpis, lateness="2m", offline_after=3)
    registry.publish(stack_state.kafka_bootstrap, [exp])
    base = to_ms(exp.periods.baseline.start)
    t1, c1 = "sl-t1", "sl-c1"
    plan = [
        (t1, base, 10.0),
        (t1, base + 120_000, 20.0),
        (c1, base + 60_000, 30.0),  # out of order, within lateness: revises its window
        (c1, base + 20 * 60_000, 40.0),  # the watermark moves 18 minutes on
        (t1, base + 30_000, 99.0),  # its window closed 17 minutes ago, lateness 2 m: late
        (t1, base + 21 * 60_000, 5.0),  # t1 back after 19 silent minutes
    ]
    with Services(stack_state, stack.logs / "services-streams-late").start() as services:
        services.wait_ingest_ready()
        with psycopg.connect(stack_state.database_url) as conn:
            for n, (device, ts, value) in enumerate(plan, start=1):
                payload = orjson.dumps({"seq": n, "ts": ts, "metrics": {"no2": value}})
                publish_raw(stack_state.mqtt_url, [(telemetry_topic(exp.id, device), payload)])

                def stored_n(n=n):
                    count = conn.execute(
                        "SELECT count(*) FROM readings WHERE experiment_id = %s", (exp.id,)
                    ).fetchone()[0]
                    return True if count == n else f"{count} of {n} stored"

                wait_for(stored_n, 60, conn, "readings one by one, in this order")

            def kpis_exclude_the_late_reading():
                got = stored(conn, exp.id)
                means = {(g, ws): (v, n) for (k, g, ws), (v, n, _) in got.items() if k == "no2_mean"}
                want = {
                    ("treatment", base): (10.0, 1),  # not 99: that one was late
                    ("treatment", base + 120_000): (20.0, 1),
                    ("control", base + 60_000): (30.0, 1),
                    ("control", base + 20 * 60_000): (40.0, 1),
                    ("treatment", base + 21 * 60_000): (5.0, 1),
                }
                return True if means == want else f"{means}"

            wait_for(kpis_exclude_the_late_reading, 60, conn, "KPIs")
            # the 5-minute p95 windows hold every reading but the late one, whatever the order
            want: dict[tuple, list[float]] = defaultdict(list)
            for device, ts, value in plan:
                if value != 99.0:
                    want[("treatment" if device == t1 else "control", window_start(ts, 300))].append(value)
            got = {(g, ws): (v, n) for (k, g, ws), (v, n, _) in stored(conn, exp.id).items() if k == "no2_p95"}
            assert got.keys() == want.keys()
            for key, values in want.items():
                assert got[key][1] == len(values)
                assert abs(got[key][0] - rank_value(values, 0.95)) <= SKETCH_ALPHA * rank_value(values, 0.95)

            # the sink stores what streams routed: the late reading and the liveness transitions
            def stored_outputs():
                late_rows = conn.execute(
                    "SELECT device_id, metric, ts, value FROM late_readings WHERE experiment_id = %s", (exp.id,)
                ).fetchall()
                status_rows = conn.execute(
                    "SELECT device_id, status, ts FROM device_status WHERE experiment_id = %s ORDER BY ts",
                    (exp.id,),
                ).fetchall()
                got = (
                    [(d, m, to_ms(ts), v) for d, m, ts, v in late_rows],
                    [(d, st, to_ms(ts)) for d, st, ts in status_rows],
                )
                want = (
                    [(t1, "no2", base + 30_000, 99.0)],
                    [
                        (t1, "online", base),  # first reports
                        (c1, "online", base + 60_000),
                        (t1, "offline", base + 120_000 + 3 * 60_000),
                        (t1, "online", base + 21 * 60_000),
                    ],
                )
                return True if got == want else f"{got}"

            wait_for(stored_outputs, 60, conn, "late_readings and device_status")

    late = read_topic(stack_state.kafka_bootstrap, KafkaTopics.LATE, exp.id, ReadingBatch.from_json, want=1)
    assert [(b.device_id, [(r.ts_ms, r.metrics) for r in b.readings]) for b in late] == [
        (t1, [(base + 30_000, {"no2": 99.0})])
    ]
    events = read_topic(stack_state.kafka_bootstrap, KafkaTopics.DEVICE_STATUS, exp.id, DeviceStatus.from_json, want=4)
    assert [(e.device_id, e.status, e.ts_ms, e.detail) for e in events] == [
        (t1, "online", base, "first report"),
        (c1, "online", base + 60_000, "first report"),
        (t1, "offline", base + 120_000 + 3 * 60_000, "silent for 3 expected intervals of 60 s"),
        (t1, "online", base + 21 * 60_000, "reporting again"),
    ]


# --- two workers, kill and restart ---------------------------------------------------------------


def test_two_workers_share_partitions_and_a_killed_one_recovers_without_double_counting(stack_state, stack):
    kpis = [k for k in ALL_KINDS_KPIS if k["kind"] in ("count", "mean", "quantile", "availability", "impact")]
    exps = [experiment(f"streams-two-{i}", f"s2{i}", minutes=300, kpis=kpis) for i in range(4)]
    registry.publish(stack_state.kafka_bootstrap, exps)
    log_dir = stack.logs / "services-streams-two"
    result: dict = {}
    with Services(stack_state, log_dir).start() as services:
        second_log = open(log_dir / "streams-2.log", "ab")  # noqa: SIM115
        second = subprocess.Popen(
            [sys.executable, "-m", "control", "run", "streams"],
            env={
                **services.env,
                "PILOTLAB_STREAMS_DATA_DIR": str(log_dir / "streams-2"),
                "PILOTLAB_STREAMS_METRICS_PORT": str(free_port()),  # its own: the first worker has the other
            },
            stdout=second_log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        second_log.close()
        try:
            services.wait_ingest_ready()
            publisher = threading.Thread(
                target=lambda: result.setdefault(
                    "truth", publish(stack_state.mqtt_url, exps, seed=8, duration_s=8, batch=1)
                )
            )
            publisher.start()
            time.sleep(3.0)  # mid-stream, both workers busy
            services.kill("streams")
            time.sleep(1.0)
            services.start("streams")
            publisher.join(timeout=180)
            truth = result["truth"]
            services.wait_drained(
                len(truth.accepted), 0, experiment_ids=[e.id for e in exps], timeout=240
            )
            assert second.poll() is None, "the second worker died"
            with psycopg.connect(stack_state.database_url) as conn:
                for exp in exps:
                    try:
                        wait_for(kpis_match(conn, exp), 120, conn, f"{exp.id} after a worker was killed")
                    except pytest.fail.Exception as failed:
                        pytest.fail(f"{failed}\nthe workers' rebalances:\n{rebalances(log_dir)}")
            # the partitions are shared: once the killed worker's session has expired (its
            # partitions stay assigned to it until then), each live worker holds some, together all
            wait_for(lambda: shared_assignment(log_dir), 60, what="the two workers' last assignments")
            assert second.poll() is None, "the second worker died"
        finally:
            second.terminate()
            try:
                second.wait(30)
            except subprocess.TimeoutExpired:
                second.kill()
                second.wait()
    for name in ("streams.log", "streams-2.log"):
        # no Faust service crashed on the way (a recovery ConsistencyError, say, is logged, then
        # the worker leaves the group: with tansu 0.6.0 that can wedge the group, see docs/broker-behaviours.md)
        lines = (log_dir / name).read_text().splitlines()
        assert not [ln for ln in lines if "[ERROR]" in ln or "[CRITICAL]" in ln], name


def rebalances(log_dir) -> str:
    """Each worker's generations and assignments, as logged: what a failure needs to be read."""
    return "\n".join(
        f"{name}: {ln.strip()}"
        for name in ("streams.log", "streams-2.log")
        for ln in (log_dir / name).read_text(errors="replace").splitlines()
        if "assigned pilotlab.readings" in ln or "generation id" in ln or "WARNING" in ln
    )


def shared_assignment(log_dir) -> bool | str:
    """True when each worker's last logged assignment of pilotlab.readings holds partitions,
    none in both, all four together."""
    last = {}
    for name in ("streams.log", "streams-2.log"):
        lines = [ln for ln in (log_dir / name).read_text().splitlines() if "assigned pilotlab.readings" in ln]
        last[name] = set(orjson.loads(lines[-1].rsplit(":", 1)[1])) if lines else set()
    a, b = last.values()
    return True if a and b and not a & b and a | b == {0, 1, 2, 3} else f"{last}"
