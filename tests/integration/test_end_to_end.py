"""The whole chain on real services: MQTT → ingest → Kafka → Faust → sink → PostgreSQL.

Publishes a known set of readings (simulated devices plus hand-made duplicates, spoofs and
broken payloads) and checks, against what was published:
- every valid reading is stored exactly once, with its value;
- every KPI window equals the value computed directly from the published data;
- every invalid message is in ``rejections`` with its reason.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from datetime import timedelta

import orjson
import paho.mqtt.client as mqtt
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from control.services import Services
from pilotlab import registry
from pilotlab.contracts import Reason, telemetry_topic, to_ms, utcnow
from pilotlab.credentials import MqttEndpoint
from pilotlab.manifest import Experiment
from simulators.publisher import publish
from streams.aggregators import aggregate
from streams.engine import window_start

pytestmark = pytest.mark.integration


def make_experiment(exp_id: str, prefix: str, minutes: int = 90) -> Experiment:
    now = utcnow().replace(second=0, microsecond=0)
    start, mid = now - timedelta(minutes=minutes), now - timedelta(minutes=minutes // 2)
    devices = [
        {"id": f"{prefix}-t{i}", "kind": "air_quality", "group": "treatment", "interval": "1m"}
        for i in (1, 2)
    ] + [
        {"id": f"{prefix}-c{i}", "kind": "air_quality", "group": "control", "interval": "1m"} for i in (1, 2)
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
            "kpis": [
                {"name": "no2_mean", "metric": "no2", "kind": "mean", "window": "1m"},
                {"name": "no2_min", "metric": "no2", "kind": "min", "window": "1m"},
                {"name": "no2_max_15m", "metric": "no2", "kind": "max", "window": "15m"},
                {"name": "no2_count_15m", "metric": "no2", "kind": "count", "window": "15m"},
                {"name": "pm25_sum_5m", "metric": "pm25", "kind": "sum", "window": "5m"},
            ],
            "simulation": {"true_effects": {"no2": -0.2}, "bad_message_rate": 0.05},
        }
    )


def publish_raw(mqtt_url: str, messages: list[tuple[str, bytes]]) -> None:
    endpoint = MqttEndpoint.parse(mqtt_url)  # carries the lab's account: anonymous access is off
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="e2e-raw")
    endpoint.configure(client)
    client.connect(endpoint.host, endpoint.port)
    client.loop_start()
    try:
        infos = [client.publish(topic, payload, qos=1) for topic, payload in messages]
        for info in infos:
            info.wait_for_publish(timeout=30)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def expected_kpis(exp: Experiment, accepted: dict[tuple[str, str, int], float]) -> dict[tuple, tuple]:
    """Batch recomputation straight from the published data: (kpi, group, start) → (value, n)."""
    groups = {d.id: d.group for d in exp.devices}
    values: dict[tuple, list[float]] = defaultdict(list)
    for (device, metric, ts_ms), value in sorted(accepted.items(), key=lambda kv: kv[0][2]):
        for kpi in exp.kpis:
            if kpi.metric == metric:
                values[(kpi.name, groups[device], window_start(ts_ms, kpi.window))].append(value)
    kinds = {k.name: k.kind for k in exp.kpis}
    return {key: (aggregate(kinds[key[0]], vs), len(vs)) for key, vs in values.items()}


def stored_kpis(conn: psycopg.Connection, exp_id: str) -> dict[tuple, tuple]:
    rows = conn.execute(
        "SELECT kpi, device_group, window_start, value, sample_count FROM kpi_values WHERE experiment_id = %s",
        (exp_id,),
    ).fetchall()
    return {(k, g, to_ms(ws)): (v, n) for k, g, ws, v, n in rows}


def test_known_readings_flow_through_exactly_once(stack_state, stack):
    exp_a = make_experiment("e2e-alpha", "ea")
    exp_b = make_experiment("e2e-beta", "eb")
    registry.publish(stack_state.kafka_bootstrap, [exp_a, exp_b])

    with Services(stack_state, stack.logs / "services-e2e").start() as services:
        services.wait_ingest_ready()
        truth = publish(stack_state.mqtt_url, [exp_a, exp_b], seed=11, duration_s=3, batch=3)

        # hand-made traffic: a message sent twice, a spoofed topic, unknown ids, bad topic
        extra_ts = to_ms(exp_a.periods.intervention.start) + 30_000  # between two simulated samples
        extra = orjson.dumps({"seq": 10_000, "ts": extra_ts, "metrics": {"no2": 33.5, "pm25": 9.25}})
        a_dev = exp_a.devices[0].id
        publish_raw(
            stack_state.mqtt_url,
            [
                (telemetry_topic(exp_a.id, a_dev), extra),
                (telemetry_topic(exp_a.id, a_dev), extra),  # the same bytes again: stored once, refused
                (telemetry_topic(exp_b.id, a_dev), extra),  # a's device writing into b
                (telemetry_topic(exp_a.id, "ghost-device"), extra),
                (telemetry_topic("no-such-experiment", a_dev), extra),
                (telemetry_topic(exp_a.id, a_dev), b'{"seq": 1, "ts": "yesterday", "metrics": {"no2": 1}}'),
            ],
        )
        accepted = dict(truth.accepted)
        accepted[(a_dev, "no2", extra_ts)] = 33.5
        accepted[(a_dev, "pm25", extra_ts)] = 9.25
        rejected = Counter(truth.rejected)
        rejected.update(
            [
                Reason.DUPLICATE,  # the second copy: same device and seq
                Reason.DEVICE_NOT_IN_EXPERIMENT,
                Reason.UNKNOWN_DEVICE,
                Reason.UNKNOWN_EXPERIMENT,
                Reason.WRONG_TYPE,
            ]
        )
        assert sum(truth.rejected.values()) > 0, "the scenario should include broken payloads"

        ids = [exp_a.id, exp_b.id, "no-such-experiment"]
        services.wait_drained(len(accepted), sum(rejected.values()), experiment_ids=ids, timeout=120)

        with psycopg.connect(stack_state.database_url) as conn:
            rows = conn.execute(
                "SELECT device_id, metric, ts, value FROM readings WHERE experiment_id = ANY(%s)", (ids,)
            ).fetchall()
            stored = {(d, m, to_ms(ts)): v for d, m, ts, v in rows}
            assert len(rows) == len(stored) == len(accepted), "each valid reading stored exactly once"
            assert stored == accepted

            got_rejections = Counter(
                Reason(r)
                for (r,) in conn.execute(
                    "SELECT reason FROM rejections WHERE experiment_id = ANY(%s)", (ids,)
                ).fetchall()
            )
            assert got_rejections == rejected

            # KPIs arrive right after the readings: poll briefly for the last revisions
            for exp in (exp_a, exp_b):
                device_ids = {d.id for d in exp.devices}
                want = expected_kpis(exp, {k: v for k, v in accepted.items() if k[0] in device_ids})
                deadline = time.monotonic() + 60
                while True:
                    got = stored_kpis(conn, exp.id)
                    if got.keys() == want.keys() and all(
                        got[k][1] == want[k][1] and got[k][0] == pytest.approx(want[k][0], rel=1e-9, abs=1e-9)
                        for k in want
                    ):
                        break
                    if time.monotonic() > deadline:
                        missing = len(want.keys() - got.keys())
                        wrong = [k for k in want.keys() & got.keys() if got[k][1] != want[k][1]][:5]
                        pytest.fail(f"{exp.id}: {missing} KPI windows missing; wrong counts e.g. {wrong}")
                    time.sleep(0.5)
                    conn.commit()  # a fresh snapshot on the next read
