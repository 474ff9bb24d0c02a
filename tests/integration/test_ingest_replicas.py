"""Two ingest replicas share one stream through an MQTT shared subscription: both take part,
and every message is forwarded to Kafka exactly once (no duplicate forwarding), including
SenML packs and a re-sent seq refused as ``duplicate``."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from control.stack import free_port
from pilotlab import registry
from pilotlab.contracts import KafkaTopics, Reason, telemetry_topic, to_ms, utcnow
from pilotlab.credentials import MqttEndpoint
from tests.integration.test_end_to_end import make_experiment
from tests.integration.test_ingest_auth import Mqtt5, ingest_metric, kafka_records, wait_until

pytestmark = pytest.mark.integration

MESSAGES_PER_DEVICE = 60


SHARE_GROUP = "replicas-test"  # its own group: other tests' offline ingest sessions take no share


def start_replica(stack_state, name: str, log_dir) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {
        **os.environ,
        **stack_state.env(),
        "PILOTLAB_INGEST_METRICS_PORT": str(port),
        "PILOTLAB_INGEST_CLIENT_ID": f"replicas-test-{name}",  # one persistent session each
        "PILOTLAB_INGEST_SHARE_GROUP": SHARE_GROUP,
    }
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "control", "run", "ingest"],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    return proc, port


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def discard_session(ep: MqttEndpoint, client_id: str) -> None:
    """A stopped replica's persistent session stays in the shared group and keeps taking its
    share of messages (queued until it returns): a replica removed for good must have its
    session discarded, which a clean-session connect with its client id does."""
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
    ep.configure(client)
    client.connect(ep.host, ep.port)
    client.loop_start()
    try:
        wait_until(client.is_connected, 10, f"{client_id} did not reconnect")
    finally:
        client.disconnect()
        client.loop_stop()


def test_two_replicas_split_one_stream_without_duplicate_forwarding(stack_state, stack):
    exp = make_experiment("replicas", "rp")
    registry.publish(stack_state.kafka_bootstrap, [exp])
    procs = [start_replica(stack_state, name, stack.logs / "replicas") for name in ("a", "b")]
    try:
        for proc, port in procs:
            wait_until(
                lambda p=proc, m=port: p.poll() is None
                and ingest_metric(m, "pilotlab_ingest_subscribed") == 1,
                60,
                "a replica did not subscribe",
            )
        ep = MqttEndpoint.parse(stack_state.mqtt_url)
        pub = Mqtt5(ep.host, ep.port, ep.username, ep.password)
        now = to_ms(utcnow())
        sent: Counter = Counter()
        try:
            for seq in range(MESSAGES_PER_DEVICE):
                for i, dev in enumerate(exp.devices):
                    topic = telemetry_topic(exp.id, dev.id)
                    if seq % 3 == 0:  # every third message is a SenML pack of two records
                        t = (now - 600_000 + seq * 1000 + i) / 1000
                        payload = orjson.dumps([{"bt": t, "n": "no2", "v": 20.0}, {"n": "PM2.5", "v": 5.0}])
                    else:
                        payload = orjson.dumps(
                            {"seq": seq, "ts": now - 600_000 + seq * 1000 + i, "metrics": {"no2": 21.0}}
                        )
                    assert pub.publish(topic, payload) == "Success"
                    sent[dev.id] += 1
            # a device re-sends seq 1: forwarded by neither replica when the same replica sees it,
            # at most once more otherwise (a different replica's memory): never counted twice
            # downstream, where readings are keyed on (device, metric, ts)
            dev0 = exp.devices[0].id
            again = orjson.dumps({"seq": 1, "ts": now - 600_000 + 1000, "metrics": {"no2": 21.0}})
            assert pub.publish(telemetry_topic(exp.id, dev0), again) == "Success"
        finally:
            pub.close()
        total = sum(sent.values()) + 1

        def acked() -> float:
            return sum(ingest_metric(port, "pilotlab_ingest_acked_messages_total") for _, port in procs)

        wait_until(lambda: acked() >= total, 120, f"not all {total} messages acknowledged")
        per_replica = [ingest_metric(port, "pilotlab_ingest_messages_total") for _, port in procs]
        assert sum(per_replica) == total, "each message was delivered to exactly one replica"
        assert all(n > 0 for n in per_replica), f"both replicas take part: {per_replica}"

        batches = kafka_records(
            stack_state.kafka_bootstrap, KafkaTopics.READINGS, {exp.id},
            lambda r: sum(len(b["readings"]) for b in r) >= total - 1,
        )  # fmt: skip
        keys = Counter((b["device_id"], ts) for b in batches for _seq, ts, _m in b["readings"])
        expected = {(d.id, now - 600_000 + s * 1000 + i) for s in range(MESSAGES_PER_DEVICE)
                    for i, d in enumerate(exp.devices)}  # fmt: skip
        assert set(keys) == expected
        resend = (dev0, now - 600_000 + 1000)
        duplicates = {k: n for k, n in keys.items() if n > 1}
        assert duplicates in ({}, {resend: 2}), f"forwarded more than once: {duplicates}"
        dead = kafka_records(
            stack_state.kafka_bootstrap, KafkaTopics.REJECTIONS, {exp.id}, lambda r: len(r) + len(duplicates) >= 1
        )
        assert [r["reason"] for r in dead] == ([] if duplicates else [Reason.DUPLICATE])
    finally:
        for proc, _ in procs:
            stop(proc)
        for name in ("a", "b"):
            discard_session(MqttEndpoint.parse(stack_state.mqtt_url), f"replicas-test-{name}")
