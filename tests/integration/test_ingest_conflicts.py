"""A device that sends different values for the same instant is told so: on real services,
500 readings of one device at one timestamp with 500 seqs store one row, and every other
value is refused as ``conflicting_reading`` — in ``rejections``, on the device's feedback
topic and on ingest's /metrics — while exact repeats are dropped and counted."""

from __future__ import annotations

import re
import urllib.request

import orjson
import psycopg
import pytest

from control.services import Services
from pilotlab import credentials, registry
from pilotlab.contracts import feedback_topic, telemetry_topic, to_ms, utcnow
from pilotlab.credentials import MqttEndpoint
from tests.integration.test_end_to_end import make_experiment
from tests.integration.test_ingest_auth import connect_when_reloaded, wait_until

pytestmark = pytest.mark.integration


def metric(port: int, name: str, labels: str = "") -> float:
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return 0.0
    m = re.search(rf"^{re.escape(name + labels)} ([0-9.e+]+)$", body, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def test_conflicting_values_are_refused_with_their_own_code(stack_state, stack) -> None:
    exp = make_experiment("conflicts", "cf")
    registry.publish(stack_state.kafka_bootstrap, [exp])
    current = registry.read_all(stack_state.kafka_bootstrap)
    credentials.sync_stack(stack.data_dir, stack_state.services["mqtt"].pid, current.experiments.values())
    device = exp.devices[0].id
    ep = MqttEndpoint.parse(stack_state.mqtt_url)
    ts = to_ms(utcnow()) - 60_000
    values = [40.0 + i % 7 for i in range(500)]  # one instant, 7 distinct values, 500 seqs
    batch = orjson.dumps([{"seq": i, "ts": ts, "metrics": {"no2": v}} for i, v in enumerate(values)])
    conflicts = sum(v != values[0] for v in values)
    repeats = 499 - conflicts
    with Services(stack_state, stack.logs / "services-conflicts").start("ingest", "sink") as services:
        services.wait_ingest_ready()
        dev = connect_when_reloaded(ep.host, ep.port, device, credentials.stack_device_password(stack.data_dir, device))
        try:
            dev.subscribe(feedback_topic(exp.id, device))
            assert dev.publish(telemetry_topic(exp.id, device), batch) == "Success"
            wait_until(lambda: len(dev.messages) >= 1, 30, "no feedback")
        finally:
            dev.close()
        feedback = orjson.loads(dev.messages[0][1])["rejections"]
        assert {r["reason"] for r in feedback} == {"conflicting_reading"}
        assert sorted(r["item_index"] for r in feedback) == [i for i, v in enumerate(values) if v != values[0]]
        with psycopg.connect(stack_state.database_url) as conn:

            def stored() -> bool:
                conn.commit()
                n = conn.execute("SELECT count(*) FROM rejections WHERE experiment_id = %s", (exp.id,)).fetchone()
                r = conn.execute("SELECT count(*) FROM readings WHERE experiment_id = %s", (exp.id,)).fetchone()
                return n[0] >= conflicts and r[0] >= 1

            wait_until(stored, 60, "conflicts and the reading not stored")
            rows = conn.execute("SELECT ts, value FROM readings WHERE experiment_id = %s", (exp.id,)).fetchall()
            assert [(to_ms(t), v) for t, v in rows] == [(ts, values[0])]  # the first value, once
            reasons = conn.execute("SELECT reason, count(*) FROM rejections WHERE experiment_id = %s GROUP BY 1",
                                   (exp.id,)).fetchall()  # fmt: skip
            assert reasons == [("conflicting_reading", conflicts)]
        port = services.metrics_port
        assert metric(port, "pilotlab_ingest_rejections_total", '{reason="conflicting_reading"}') == conflicts
        assert metric(port, "pilotlab_ingest_repeated_readings_total") == repeats
        assert metric(port, "pilotlab_ingest_readings_total") == 1
