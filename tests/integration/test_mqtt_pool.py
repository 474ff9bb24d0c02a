"""simulators.engine's unthreaded ``MqttPool`` (the load generator's, issue 17) on the real
Mosquitto: every message reaches a subscriber once, in order per topic, and ``send`` returns
only once each is acknowledged — paced, and as fast as it goes past the 1,000-message
in-flight window of each connection."""

from __future__ import annotations

import threading
import time
import uuid

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from pilotlab.credentials import MqttEndpoint
from simulators.engine import MqttPool, send


@pytest.fixture
def subscriber(stack_state):
    """A QoS 1 subscriber to a fresh topic prefix; yields (prefix, received (topic, payload) list)."""
    prefix = f"pilots/pool-{uuid.uuid4().hex[:8]}"
    got: list[tuple[str, bytes]] = []
    subscribed = threading.Event()
    ep = MqttEndpoint.parse(stack_state.mqtt_url)
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"pool-sub-{uuid.uuid4().hex[:8]}")
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


@pytest.mark.parametrize(("messages", "spacing_s"), [(300, 0.002), (5_000, 0.0)])
def test_unthreaded_pool_delivers_every_message_once_in_order_and_waits_for_each_ack(
    stack_state, subscriber, messages, spacing_s
) -> None:
    prefix, got = subscriber
    topics = [f"{prefix}/d{i}/telemetry" for i in range(7)]
    sent = [(topics[i % 7], f"m{i}".encode()) for i in range(messages)]
    client_id = f"pool-{uuid.uuid4().hex[:6]}"
    with MqttPool(stack_state.mqtt_url, connections=2, client_id=client_id, threaded=False) as pool:
        assert not any(c._thread for c in pool.clients)  # no network thread: the caller drives them
        stats = send(pool, ((i * spacing_s, t, p) for i, (t, p) in enumerate(sent)), ack_timeout=120)
        assert stats.messages == messages
        assert all(not c._out_messages for c in pool.clients)  # every PUBACK is in
    wait_for(got, messages)
    assert sorted(got) == sorted(sent)  # each once
    for topic in topics:  # a topic keeps its connection: its order holds
        assert [p for t, p in got if t == topic] == [p for t, p in sent if t == topic]
