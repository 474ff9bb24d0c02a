"""The load generator's MQTT 3.1.1 publisher: QoS 1 PUBLISH packets written straight to the
socket, PUBACKs read in bulk. Benchmark-only.

Why not paho: at 60,000 datapoints/s (2,000 messages/s) paho's per-message bookkeeping cost the
load generator about 4 µs of CPU per datapoint (``bench/bench_ingest.py --cpu``), an eighth of
the 2-core box the pipeline is measured on. Devices are not on the pipeline's machine in
practice, so what the generator burns is taken from what is measured; every peer gets the same
generator, so the comparison stays even. This publisher does only what the workload needs:
CONNECT with a user name and password (clean session, no keep-alive: it writes continuously
and disconnects when done), QoS 1 PUBLISH, at most ``inflight`` unacknowledged packets per
connection, PUBACKs read whenever it waits. A broker that refuses the connection or sends
anything else ends the run with an error; nothing is retried (a benchmark that lost its
broker has no figure to give). Plain TCP only (the embedded stack's broker).
"""

from __future__ import annotations

import select
import socket
import struct
import time
import zlib
from urllib.parse import unquote, urlparse

CONNACK, PUBACK, PINGRESP = 0x20, 0x40, 0xD0
_REFUSED = {1: "unacceptable protocol version", 2: "identifier rejected", 3: "server unavailable",
            4: "bad user name or password", 5: "not authorised"}  # fmt: skip


class MqttWireError(ConnectionError):
    """The broker refused, closed or answered out of protocol."""


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(s: str) -> bytes:
    b = s.encode()
    return struct.pack("!H", len(b)) + b


def connect_packet(client_id: str, username: str | None, password: str | None, *, clean: bool = True) -> bytes:
    """CONNECT, MQTT 3.1.1, keep-alive off; ``clean=False`` asks for a persistent session."""
    flags = 0x02 if clean else 0x00
    body = _utf8(client_id)
    if username is not None:
        flags |= 0x80
        body += _utf8(username)
        if password is not None:
            flags |= 0x40
            body += _utf8(password)
    variable = _utf8("MQTT") + bytes([4, flags]) + struct.pack("!H", 0)  # 3.1.1, keep-alive off
    rest = variable + body
    return bytes([0x10]) + _remaining_length(len(rest)) + rest


def publish_packet(topic: bytes, packet_id: int, payload: bytes) -> bytes:
    """A QoS 1 PUBLISH (``topic`` already as its length-prefixed UTF-8)."""
    n = len(topic) + 2 + len(payload)
    return b"".join((b"\x32", _remaining_length(n), topic, packet_id.to_bytes(2, "big"), payload))


def read_packets(buf: bytearray) -> list[tuple[int, bytes]]:
    """Whole packets at the front of ``buf`` (removed from it): (type byte, body)."""
    out, i, n = [], 0, len(buf)
    while i + 2 <= n:
        length, mult, j = 0, 1, i + 1
        while True:
            if j >= n:
                del buf[:i]
                return out
            b = buf[j]
            length += (b & 0x7F) * mult
            mult *= 128
            j += 1
            if not b & 0x80:
                break
        if j + length > n:
            break
        out.append((buf[i], bytes(buf[j : j + length])))
        i = j + length
    del buf[:i]
    return out


class _Connection:
    def __init__(
        self, host: str, port: int, *, client_id: str, username: str | None, password: str | None,
        inflight: int, timeout: float,
    ) -> None:  # fmt: skip
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.inbox = bytearray()
        self.pending: set[int] = set()
        self.next_id = 1
        self.inflight = inflight
        try:
            self._connect(connect_packet(client_id, username, password), host, port, timeout)
        except BaseException:
            self.sock.close()
            raise

    def _connect(self, packet: bytes, host: str, port: int, timeout: float) -> None:
        self.sock.sendall(packet)
        deadline = time.monotonic() + timeout
        while True:
            for kind, body in self._read(max(0.0, deadline - time.monotonic())):
                if kind != CONNACK or len(body) != 2:
                    raise MqttWireError(f"expected CONNACK, got packet type {kind:#x}")
                if body[1] != 0:
                    raise MqttWireError(f"connection refused: {_REFUSED.get(body[1], body[1])}")
                self.sock.setblocking(False)
                return
            if time.monotonic() > deadline:
                raise MqttWireError(f"no CONNACK from {host}:{port} within {timeout:.0f} s")

    def _read(self, timeout: float) -> list[tuple[int, bytes]]:
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return []
        try:
            data = self.sock.recv(1 << 16)
        except BlockingIOError:
            return []
        if not data:
            raise MqttWireError("the broker closed the connection")
        self.inbox += data
        return read_packets(self.inbox)

    def serve(self, timeout: float) -> None:
        """Read what came in (PUBACKs), waiting at most ``timeout`` for the first bytes."""
        for kind, body in self._read(timeout):
            if kind == PUBACK:
                self.pending.discard(int.from_bytes(body[:2], "big"))
            elif kind != PINGRESP:
                raise MqttWireError(f"unexpected packet type {kind:#x} from the broker")

    def publish(self, topic: bytes, payload: bytes, deadline: float) -> None:
        while len(self.pending) >= self.inflight:
            if time.monotonic() > deadline:
                raise MqttWireError(f"{len(self.pending)} PUBACKs outstanding past the deadline")
            self.serve(0.05)
        pid = self.next_id
        while pid in self.pending:
            pid = pid % 65535 + 1
        self.next_id = pid % 65535 + 1
        self.pending.add(pid)
        data = publish_packet(topic, pid, payload)
        while data:
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                select.select([], [self.sock], [], 1.0)
                self.serve(0)
                continue
            data = data[sent:]

    def close(self) -> None:
        try:
            self.sock.setblocking(True)
            self.sock.sendall(b"\xe0\x00")  # DISCONNECT
        except OSError:
            pass
        self.sock.close()


class WirePool:
    """``connections`` publishers; a topic keeps its connection (as simulators.engine.MqttPool).
    A context manager: connects on enter, disconnects on exit."""

    def __init__(self, url: str, *, connections: int = 2, client_id: str = "pilotlab-load", inflight: int = 1000,
                 timeout: float = 10.0) -> None:  # fmt: skip
        u = urlparse(url)
        if u.scheme != "mqtt":
            raise ValueError(f"{url!r}: the load generator publishes over plain mqtt://host:port only")
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 1883
        self.username = unquote(u.username) if u.username else None
        self.password = unquote(u.password) if u.password else None
        self.client_id, self.n, self.inflight, self.timeout = client_id, max(1, connections), inflight, timeout
        self.conns: list[_Connection] = []
        self._topics: dict[str, tuple[_Connection, bytes]] = {}

    def __enter__(self) -> WirePool:
        try:
            self._connect_all()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _connect_all(self) -> None:
        for i in range(self.n):
            self.conns.append(
                _Connection(
                    self.host,
                    self.port,
                    client_id=f"{self.client_id}-{i}",
                    username=self.username,
                    password=self.password,
                    inflight=self.inflight,
                    timeout=self.timeout,
                )
            )

    def __exit__(self, *exc) -> None:
        for c in self.conns:
            c.close()

    def publish(self, topic: str, payload: bytes, ack_timeout: float = 300.0) -> None:
        hit = self._topics.get(topic)
        if hit is None:
            hit = self._topics[topic] = (self.conns[zlib.crc32(topic.encode()) % self.n], _utf8(topic))
        conn, wire_topic = hit
        conn.publish(wire_topic, payload, time.monotonic() + ack_timeout)

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds``, reading PUBACKs meanwhile."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            ready, _, _ = select.select([c.sock for c in self.conns], [], [], left)
            for c in self.conns:
                if c.sock in ready:
                    c.serve(0)

    def outstanding(self) -> int:
        return sum(len(c.pending) for c in self.conns)

    def wait_acked(self, timeout: float) -> None:
        """Until every PUBACK is in."""
        deadline = time.monotonic() + timeout
        while self.outstanding():
            if time.monotonic() > deadline:
                raise MqttWireError(f"{self.outstanding()} PUBACKs still outstanding after {timeout:.0f} s")
            self.sleep(0.05)
