"""The load generator's publisher (bench/e2e/mqtt_wire.py) on the real Mosquitto: every message
reaches a subscriber once, in order per topic, and ``wait_acked`` returns only once each is
acknowledged — paced, and as fast as it goes past the in-flight window of each connection; a
wrong password is refused with the broker's reason."""

from __future__ import annotations

import threading
import time
import uuid
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bench.e2e.mqtt_wire import MqttWireError, WirePool
from pilotlab.credentials import MqttEndpoint


@pytest.fixture
def subscriber(stack_state):
    """A QoS 1 subscriber to a fresh topic prefix; yields (prefix, received (topic, payload) list)."""
    prefix = f"pilots/wire-{uuid.uuid4().hex[:8]}"
    got: list[tuple[str, bytes]] = []
    subscribed = threading.Event()
    ep = MqttEndpoint.parse(stack_state.mqtt_url)
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"wire-sub-{uuid.uuid4().hex[:8]}")
    ep.configure(c)
    c.on_connect = lambda cl, *_a: cl.subscribe(f"{prefix}/#", qos=1)
    c.on_subscribe = lambda *_a: subscribed.set()
    c.on_message = lambda _c, _u, m: got.append((m.topic, m.payload))
    c.connect(ep.host, ep.port)
    c.loop_start()
    try:
        assert subscribed.wait(30)
        yield prefix, got
    finally:
        c.disconnect()
        c.loop_stop()


def wait_for(got: list, n: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.mark.parametrize(("messages", "spacing_s", "inflight"), [(300, 0.002, 1000), (5_000, 0.0, 100)])
def test_every_message_arrives_once_in_order_and_every_ack_is_waited_for(
    stack_state, subscriber, messages, spacing_s, inflight
) -> None:
    prefix, got = subscriber
    topics = [f"{prefix}/d{i}/telemetry" for i in range(7)]
    sent = [(topics[i % 7], f"m{i}".encode() * (1 + i % 50)) for i in range(messages)]
    with WirePool(stack_state.mqtt_url, connections=2, client_id=f"wire-{uuid.uuid4().hex[:6]}",
                  inflight=inflight) as pool:  # fmt: skip
        for topic, body in sent:
            pool.publish(topic, body)
            assert all(len(c.pending) <= inflight for c in pool.conns)
            if spacing_s:
                pool.sleep(spacing_s)
        pool.wait_acked(timeout=120)
        assert pool.outstanding() == 0
    wait_for(got, messages)
    assert sorted(got) == sorted(sent)  # each once
    for topic in topics:  # a topic keeps its connection: its order holds
        assert [p for t, p in got if t == topic] == [p for t, p in sent if t == topic]


def test_a_wrong_password_is_refused_with_the_brokers_reason(stack_state) -> None:
    u = urlparse(stack_state.mqtt_url)
    wrong = u._replace(netloc=f"{u.username}:not-the-password@{u.hostname}:{u.port}").geturl()
    refused = pytest.raises(MqttWireError, match=r"connection refused: (bad user name or password|not authorised)")
    with refused, WirePool(wrong, connections=1, client_id=f"wire-{uuid.uuid4().hex[:6]}"):
        pass


def test_only_plain_mqtt_urls_are_taken() -> None:
    with pytest.raises(ValueError, match="plain mqtt://"):
        WirePool("mqtts://u:p@127.0.0.1:8883")
