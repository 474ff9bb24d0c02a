"""Send planned messages over MQTT on a (possibly accelerated) clock.

:class:`MqttPool` holds a few paho connections, each with its own network thread and a
1,000-message in-flight window at QoS 1. A topic always goes through the same connection,
so one device's messages keep their order. Measured on a 2-core machine (see
``bench/bench_simulator.py``), paho's threaded clients sustain several thousand QoS 1
messages/s where an asyncio client (aiomqtt) sustained fewer: the event loop paid a Python
future per PUBACK. The pacing loop itself is a plain loop that sleeps until the next message
is due and publishes everything due in one go.

:func:`send` is the one loop used by scenarios and replays: ``messages`` come with their due
time (seconds after the start); it returns once the broker has acknowledged every message.
"""

from __future__ import annotations

import contextlib
import ssl
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

__all__ = ["MqttPool", "SendStats", "send"]


class MqttPool:
    """``connections`` MQTT clients; ``publish`` routes by topic. A context manager."""

    def __init__(
        self,
        url: str,
        *,
        connections: int = 4,
        client_id: str = "pilotlab-sim",
        username: str | None = None,
        password: str | None = None,
        inflight: int = 1000,
        ca_file: str | None = None,
    ) -> None:
        u = urlparse(url)
        if u.scheme not in ("mqtt", "mqtts"):
            raise ValueError(f"{url!r}: an MQTT URL looks like mqtt://host:port")
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or (8883 if u.scheme == "mqtts" else 1883)
        self.username = username if username is not None else (unquote(u.username) if u.username else None)
        self.password = password if password is not None else (unquote(u.password) if u.password else None)
        self.tls = u.scheme == "mqtts"
        self.ca_file = ca_file
        self.clients: list[mqtt.Client] = []
        for i in range(max(1, connections)):
            c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"{client_id}-{i}")
            c.max_inflight_messages_set(inflight)
            c.max_queued_messages_set(0)
            if self.username is not None:
                c.username_pw_set(self.username, self.password)
            if self.tls:
                c.tls_set(ca_certs=ca_file, cert_reqs=ssl.CERT_REQUIRED)
            self.clients.append(c)
        self._connected = False

    def connect(self, timeout: float = 10.0) -> MqttPool:
        for c in self.clients:
            rc = c.connect(self.host, self.port, keepalive=60)
            if rc != mqtt.MQTT_ERR_SUCCESS:
                raise ConnectionError(f"MQTT connect to {self.host}:{self.port} failed: {mqtt.error_string(rc)}")
            c.loop_start()
        deadline = time.monotonic() + timeout
        while not all(c.is_connected() for c in self.clients):
            if time.monotonic() > deadline:
                self.close()
                raise ConnectionError(
                    f"MQTT broker {self.host}:{self.port} did not accept the connection within {timeout:.0f} s "
                    "(credentials?)"
                )
            time.sleep(0.01)
        self._connected = True
        return self

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> mqtt.MQTTMessageInfo:
        client = self.clients[zlib.crc32(topic.encode()) % len(self.clients)]
        return client.publish(topic, payload, qos=qos, retain=retain)

    def close(self) -> None:
        for c in self.clients:
            with contextlib.suppress(OSError):
                c.disconnect()
            c.loop_stop()
        self._connected = False

    def __enter__(self) -> MqttPool:
        if not self._connected:
            self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class SendStats:
    messages: int = 0
    wall_s: float = 0.0
    max_lag_s: float = 0.0  # how far behind schedule the worst message was sent

    @property
    def rate(self) -> float:
        return self.messages / self.wall_s if self.wall_s > 0 else 0.0


def send(
    pool: MqttPool,
    messages: Iterable[tuple[float, str, bytes]],
    *,
    start: float | None = None,
    total: int | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    ack_timeout: float = 120.0,
    qos: int = 1,
) -> SendStats:
    """Publish ``(due seconds after start, topic, payload)`` in the given order, each no
    earlier than its due time (``start``: a ``time.monotonic()`` value; default now).
    Returns once every message is acknowledged; raises ``TimeoutError`` otherwise."""
    start = time.monotonic() if start is None else start
    stats = SendStats()
    outstanding: deque[mqtt.MQTTMessageInfo] = deque()
    t0 = time.monotonic()
    for due, topic, payload in messages:
        now = time.monotonic()
        wait = start + due - now
        if wait > 0.002:
            time.sleep(wait)
        elif wait < 0:
            stats.max_lag_s = max(stats.max_lag_s, -wait)
        info = pool.publish(topic, payload, qos=qos)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"MQTT publish failed: {mqtt.error_string(info.rc)}")
        outstanding.append(info)
        stats.messages += 1
        while outstanding and outstanding[0].is_published():
            outstanding.popleft()
        if progress is not None and stats.messages % 2000 == 0:
            progress(stats.messages, total)
    deadline = time.monotonic() + ack_timeout
    while outstanding:
        info = outstanding.popleft()
        info.wait_for_publish(timeout=max(0.0, deadline - time.monotonic()))
        if not info.is_published():
            raise TimeoutError(f"the MQTT broker did not acknowledge every message within {ack_timeout:.0f} s")
    stats.wall_s = time.monotonic() - t0
    if progress is not None:
        progress(stats.messages, total)
    return stats
