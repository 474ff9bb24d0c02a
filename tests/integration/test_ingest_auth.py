"""Device authorisation against the real broker and the real ingest service:

- the embedded broker refuses anonymous clients and wrong passwords;
- a manifest applied while the broker runs gets working device credentials (SIGHUP reload);
- a device publishing into another experiment's topic is refused by the broker (Mosquitto:
  MQTT 5 PUBACK "Not authorized"; amqtt, MQTT 3.1.1 only, acknowledges and drops it) and
  never reaches ingest;
- with a broker that enforces no ACL, the same spoof is refused by ingest as
  ``device_not_in_experiment``: in the dead-letter topic and on the device's feedback topic.

The stack here is the one the machine gives (Mosquitto when installed, else amqtt);
tests/integration/test_fallback.py runs these tests again on amqtt and embedded PostgreSQL.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from paho.mqtt.enums import CallbackAPIVersion

from control.services import Services
from control.stack import AMQTT_SCRIPT, StackError, StackState, choose_mqtt, free_port, port_answers, wanted_parts
from pilotlab import credentials, registry
from pilotlab.contracts import KafkaTopics, Reason, feedback_topic, telemetry_topic, to_ms, utcnow
from pilotlab.credentials import MqttEndpoint
from tests.integration.test_end_to_end import make_experiment

pytestmark = pytest.mark.integration


# --- helpers shared with test_ingest_replicas.py ------------------------------------------------


def default_protocol() -> int:
    """MQTT 5 for the broker this machine's stack runs when it speaks it (Mosquitto); 3.1.1 for
    amqtt (the same choice as the ``stack`` fixture's ``Stack.up()``)."""
    (wanted, source), _ = wanted_parts()
    try:
        return mqtt.MQTTv5 if choose_mqtt(wanted, source).kind == "mosquitto" else mqtt.MQTTv311
    except StackError:
        return mqtt.MQTTv5


class Mqtt5:
    """A small MQTT client (MQTT 5 where the broker speaks it) that records CONNACK, PUBACK
    reason codes and messages."""

    def __init__(
        self, host: str, port: int, username: str | None, password: str | None, protocol: int | None = None
    ) -> None:
        protocol = default_protocol() if protocol is None else protocol
        self.connack = None
        self.pubacks: dict[int, str] = {}
        self.messages: list[tuple[str, bytes]] = []
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"test-{uuid.uuid4().hex[:10]}",
            protocol=protocol,
        )
        if username:
            self.client.username_pw_set(username, password)
        self.client.on_connect = lambda _c, _u, _f, rc, _p: setattr(self, "connack", rc)
        self.client.on_publish = lambda _c, _u, mid, rc, _p: self.pubacks.__setitem__(mid, str(rc))
        self.client.on_message = lambda _c, _u, m: self.messages.append((m.topic, m.payload))
        self.client.connect(host, port)
        self.client.loop_start()
        wait_until(lambda: self.connack is not None, 10, "no CONNACK")

    def publish(self, topic: str, payload: bytes) -> str:
        info = self.client.publish(topic, payload, qos=1)
        wait_until(lambda: info.mid in self.pubacks, 30, f"no PUBACK for {topic}")
        return self.pubacks[info.mid]

    def subscribe(self, topic: str) -> None:
        done = []
        self.client.on_subscribe = lambda _c, _u, _m, rcs, _p: done.append(rcs)
        self.client.subscribe(topic, qos=1)
        wait_until(lambda: done, 10, "no SUBACK")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout:.0f} s")
        time.sleep(0.05)


def connect_when_reloaded(  # noqa: PLR0917 - a test helper
    host: str, port: int, user: str, password: str, timeout: float = 30, protocol: int | None = None
) -> Mqtt5:
    """The broker reloads its files asynchronously after SIGHUP: retry until accepted."""
    deadline = time.monotonic() + timeout
    while True:
        client = Mqtt5(host, port, user, password, protocol)
        if not client.connack.is_failure:
            return client
        client.close()
        if time.monotonic() > deadline:
            raise AssertionError(f"{user} still refused after {timeout:.0f} s: {client.connack}")
        time.sleep(0.2)


def kafka_records(bootstrap: str, topic: str, experiment_ids: set[str], want, timeout: float = 60) -> list[dict]:
    """Every record of these experiments on ``topic`` (every batch of a packed readings record),
    read from the beginning, once ``want(records)`` holds and the topic is read to its current end."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"test-{uuid.uuid4().hex}", "enable.auto.commit": False}
    )
    try:
        parts = sorted(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        records: list[dict] = []
        deadline = time.monotonic() + timeout
        while True:
            msg = consumer.poll(0.2)
            if msg is not None and not msg.error():
                doc = orjson.loads(msg.value())
                # a pilotlab.readings record packs one or more messages' batches (ingest.pack)
                for one in doc if isinstance(doc, list) else [doc]:
                    if one.get("experiment_id") in experiment_ids:
                        records.append(one)
                continue
            if want(records):
                ends = [consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts]
                positions = consumer.position([TopicPartition(topic, p) for p in parts])
                pairs = zip(positions, ends, strict=True)
                if all(pos.offset >= end or (pos.offset < 0 and end == 0) for pos, end in pairs):
                    return records
            if time.monotonic() > deadline:
                raise AssertionError(f"{topic}: only {len(records)} records of {experiment_ids} in {timeout} s")
    finally:
        consumer.close()


def ingest_metric(port: int, name: str) -> float:
    """A counter or gauge of a running ingest; 0 while its /metrics endpoint is not up yet."""
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return 0.0
    m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", body, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def reading(seq: int) -> bytes:
    return orjson.dumps({"seq": seq, "ts": to_ms(utcnow()) - 1000, "metrics": {"no2": 30.0 + seq}})


def broker_kind(state: StackState) -> str:
    """mosquitto or amqtt: the stack's MQTT broker."""
    return state.parts["mqtt"]["kind"]


def protocol_for(state: StackState) -> int:
    """MQTT 5 where the broker speaks it (Mosquitto); amqtt 0.12 speaks 3.1.1 only."""
    return mqtt.MQTTv5 if broker_kind(state) == "mosquitto" else mqtt.MQTTv311


# --- the tests ---------------------------------------------------------------------------------


def test_anonymous_and_wrong_passwords_are_refused(stack_state):
    ep = MqttEndpoint.parse(stack_state.mqtt_url)
    assert ep.username == credentials.LAB_USER and ep.password
    for user, password in ((None, None), (ep.username, "wrong"), ("ghost-device", "x")):
        client = Mqtt5(ep.host, ep.port, user, password, protocol_for(stack_state))
        try:
            assert client.connack.is_failure, f"{user!r} was let in"
        finally:
            client.close()


def test_broker_refuses_a_device_writing_into_another_experiment(stack_state, stack):
    mine = make_experiment("acl-mine", "am")
    theirs = make_experiment("acl-theirs", "at")
    registry.publish(stack_state.kafka_bootstrap, [mine, theirs])
    # what `pilotlab experiments apply` does after publishing: files rewritten, SIGHUP
    current = registry.read_all(stack_state.kafka_bootstrap)
    credentials.sync_stack(
        stack.data_dir, stack_state.services["mqtt"].pid, current.experiments.values(), broker=broker_kind(stack_state)
    )
    ep = MqttEndpoint.parse(stack_state.mqtt_url)
    device = mine.devices[0].id
    password = credentials.stack_device_password(stack.data_dir, device)
    # MQTT 5 lets Mosquitto say no in the PUBACK; MQTT 3.1.1 (amqtt) has no way to: it
    # acknowledges and drops, and what reaches Kafka and ingest below is the proof
    refused = "Not authorized" if broker_kind(stack_state) == "mosquitto" else "Success"

    with Services(stack_state, stack.logs / "services-acl").start("ingest") as services:
        services.wait_ingest_ready()
        dev = connect_when_reloaded(ep.host, ep.port, device, password, protocol=protocol_for(stack_state))
        try:
            assert dev.publish(telemetry_topic(theirs.id, device), reading(1)) == refused
            assert dev.publish(telemetry_topic(mine.id, theirs.devices[0].id), reading(2)) == refused
            assert dev.publish(feedback_topic(mine.id, device), b"{}") == refused
            assert dev.publish(telemetry_topic(mine.id, device), reading(3)) == "Success"
        finally:
            dev.close()
        got = kafka_records(
            stack_state.kafka_bootstrap, KafkaTopics.READINGS, {mine.id, theirs.id}, lambda r: len(r) >= 1
        )
        assert [(r["experiment_id"], r["device_id"], [x[0] for x in r["readings"]]) for r in got] == [
            (mine.id, device, [3])
        ]
        # ingest received exactly the one authorised message: the broker dropped the others
        wait_until(
            lambda: ingest_metric(services.metrics_port, "pilotlab_ingest_acked_messages_total") >= 1, 30, "no ack"
        )
        assert ingest_metric(services.metrics_port, "pilotlab_ingest_messages_total") == 1


@pytest.fixture
def open_broker(tmp_path: Path, stack_state: StackState):
    """A broker of the stack's kind (Mosquitto or amqtt) with anonymous access and no ACL:
    what ingest must defend against alone."""
    port = free_port()
    if broker_kind(stack_state) == "mosquitto":
        conf = tmp_path / "open.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        argv = [stack_state.services["mqtt"].binary, "-c", str(conf)]
    else:
        conf = tmp_path / "open.json"
        conf.write_text(json.dumps({"listeners": {"default": {"bind": f"127.0.0.1:{port}"}}, "anonymous": True}))
        argv = [sys.executable, AMQTT_SCRIPT, "--config", str(conf)]
    log = open(tmp_path / "open.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: port_answers(port), 20, "open broker not answering")
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_with_the_broker_acl_off_ingest_refuses_the_spoof_and_tells_the_device(stack_state, stack, open_broker):
    mine = make_experiment("open-mine", "om")
    theirs = make_experiment("open-theirs", "ot")
    registry.publish(stack_state.kafka_bootstrap, [mine, theirs])
    device = mine.devices[0].id
    env = {"PILOTLAB_MQTT_URL": f"mqtt://127.0.0.1:{open_broker}", "PILOTLAB_INGEST_CLIENT_ID": "ingest-open"}
    with Services(stack_state, stack.logs / "services-open", env).start("ingest") as services:
        services.wait_ingest_ready()
        dev = Mqtt5("127.0.0.1", open_broker, None, None, protocol_for(stack_state))
        try:
            dev.subscribe(feedback_topic(theirs.id, device))
            assert dev.publish(telemetry_topic(theirs.id, device), reading(1)) == "Success"  # the broker lets it in
            assert dev.publish(telemetry_topic(mine.id, device), reading(2)) == "Success"
            wait_until(lambda: dev.messages, 30, "no feedback for the spoofed message")
            ((topic, payload),) = dev.messages
        finally:
            dev.close()
        assert topic == feedback_topic(theirs.id, device)
        (feedback,) = orjson.loads(payload)["rejections"]
        assert feedback["reason"] == Reason.DEVICE_NOT_IN_EXPERIMENT
        assert feedback["device_id"] == device and feedback["experiment_id"] == theirs.id

        dead = kafka_records(stack_state.kafka_bootstrap, KafkaTopics.REJECTIONS, {theirs.id}, lambda r: len(r) >= 1)
        assert [(r["reason"], r["device_id"]) for r in dead] == [(Reason.DEVICE_NOT_IN_EXPERIMENT, device)]
        assert "seq" in dead[0]["excerpt"]
        forwarded = kafka_records(
            stack_state.kafka_bootstrap, KafkaTopics.READINGS, {mine.id, theirs.id}, lambda r: len(r) >= 1
        )
        assert [(r["experiment_id"], [x[0] for x in r["readings"]]) for r in forwarded] == [(mine.id, [2])]


def test_credentials_files_for_an_external_broker(stack_state, tmp_path: Path):
    exp = make_experiment("files-exp", "fx")
    registry.publish(stack_state.kafka_bootstrap, [exp])
    env = {
        **os.environ,
        "PILOTLAB_KAFKA_BOOTSTRAP": stack_state.kafka_bootstrap,
        "PILOTLAB_CREDENTIALS_SECRET": "a-test-secret",
        "PILOTLAB_MQTT_PASSWORD": "lab-password",
    }
    out = tmp_path / "auth"
    result = subprocess.run(
        # the running interpreter: a bare python3 is whatever the machine has, maybe without pilotlab
        [sys.executable, "-m", "control", "credentials", "files", "--out", str(out), "--show", exp.devices[0].id],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    users = dict(line.split(":", 1) for line in (out / "passwd").read_text().splitlines())
    assert credentials.verify_mosquitto_hash("lab-password", users[credentials.LAB_USER])
    password = result.stdout.strip().splitlines()[-1].split()[1]
    assert password == credentials.derive_password(b"a-test-secret", exp.devices[0].id)
    assert credentials.verify_mosquitto_hash(password, users[exp.devices[0].id])
    acl = (out / "acl").read_text()
    assert f"user {exp.devices[0].id}\ntopic write {telemetry_topic(exp.id, exp.devices[0].id)}\n" in acl
    assert (out / "passwd").stat().st_mode & 0o777 == 0o644  # readable by the mosquitto container user
