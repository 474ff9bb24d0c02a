"""Does Mosquitto keep to ``max_inflight_messages``? How many QoS 1 messages a subscriber holds
unacknowledged at most, per configured window, while a burst arrives.

ingest acknowledges a message only once Kafka confirmed it (about 100-150 ms later), so what
Mosquitto sends it beyond its window is what decides how much sits in ingest's socket and in
Mosquitto's queue. Mosquitto 2.0.11 (Debian 12's) does not keep to the window: when a PUBACK
frees a slot, ``db__message_delete_outgoing`` moves queued messages into flight up to the
window counted from the acknowledged message's position, not from the number in flight, so
acknowledging the oldest message releases up to a whole window more (eclipse/mosquitto#2306,
"various fixes around inflight quota management", fixed in 2.0.13; 2.0.16 ignored the
setting again, #2876, fixed in 2.0.17). What bounds the messages
ingest holds is therefore its own window, ``PILOTLAB_INGEST_MAX_INFLIGHT`` (its paho thread
stops reading when it is full), not the broker's (docs/broker-behaviours.md).

The subscriber is a persistent session on a plain subscription (what ingest uses with
Mosquitto < 2.0.12) written on the socket, so that nothing but the broker decides what
arrives: it acknowledges each message ``--hold-ms`` after it arrived. The publisher is the
end-to-end benchmark's (``bench.e2e.mqtt_wire``: two connections, QoS 1).

The hold time also shows what a subscriber's acknowledgement delay costs Mosquitto: everything
not yet acknowledged is rewritten by every save.

Run: ``python bench/bench_mqtt_inflight.py [--messages 20000] [--windows 10,1000] [--holds-ms 0,20,100]``; writes
``bench/results/mqtt-inflight-<UTC>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import collections
import json
import select
import socket
import struct
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_mqtt_window import TOPIC, Broker
from bench.e2e.cpu import _written
from bench.e2e.mqtt_wire import CONNACK, WirePool, _remaining_length, _utf8, connect_packet, read_packets
from control.stack import find_mosquitto, mosquitto_version

RESULTS = Path(__file__).resolve().parent / "results"
PUBLISH, SUBACK = 0x30, 0x90
PAYLOAD = b"x" * 852  # the end-to-end workload's message size


@dataclass
class Probe:
    window: int  # Mosquitto's max_inflight_messages
    hold_ms: float
    messages: int
    received: int
    max_unacked: int  # the most messages the subscriber held unacknowledged at once
    seconds: float  # first publish → last message received
    mosquitto_written_mb: float  # bytes Mosquitto wrote to disk meanwhile (its saves)


class HoldingSubscriber(threading.Thread):
    """A persistent session that acknowledges each message ``hold_s`` after it arrived and
    counts how many it held unacknowledged at most."""

    def __init__(self, port: int, expect: int, hold_s: float) -> None:
        super().__init__(name="holding-subscriber", daemon=True)
        self.expect, self.hold_s = expect, hold_s
        self.received, self.max_unacked, self.last_at = 0, 0, 0.0
        self.error: Exception | None = None
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(connect_packet("inflight-probe", None, None, clean=False))
        sub = struct.pack("!H", 1) + _utf8(TOPIC) + bytes([1])
        self.sock.sendall(bytes([0x82]) + _remaining_length(len(sub)) + sub)
        self.buf = bytearray()
        self.subscribed = threading.Event()

    def run(self) -> None:
        try:
            self._run()
        except (OSError, struct.error) as exc:  # the caller, which joins this thread, raises it
            self.error = exc

    def _run(self) -> None:
        held: collections.deque[tuple[float, int]] = collections.deque()
        deadline = time.monotonic() + 600
        while (self.received < self.expect or held) and time.monotonic() < deadline:
            now = time.monotonic()
            acks = bytearray()
            while held and now - held[0][0] >= self.hold_s:
                acks += b"\x40\x02" + struct.pack("!H", held.popleft()[1])
            if acks:
                self.sock.sendall(acks)
            wait = max(0.0, held[0][0] + self.hold_s - now) if held else 0.05
            ready, _, _ = select.select([self.sock], [], [], min(wait, 0.05))
            if not ready:
                continue
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("the broker closed the subscriber's connection")
            self.buf += data
            for kind, body in read_packets(self.buf):
                if kind & 0xF0 == PUBLISH:
                    topic_len = struct.unpack("!H", body[:2])[0]
                    held.append((time.monotonic(), struct.unpack("!H", body[2 + topic_len : 4 + topic_len])[0]))
                    self.received += 1
                    self.last_at = time.time()
                    self.max_unacked = max(self.max_unacked, len(held))
                elif kind == SUBACK:
                    self.subscribed.set()
                elif kind != CONNACK:
                    raise ConnectionError(f"unexpected packet type {kind:#x}")
        self.sock.close()


def probe(window: int, messages: int, hold_ms: float) -> Probe:
    with tempfile.TemporaryDirectory(prefix="pilotlab-inflight-") as root:
        broker = Broker(Path(root), ["autosave_on_changes true", "autosave_interval 100"], inflight=window)
        broker.start()
        try:
            sub = HoldingSubscriber(broker.port, messages, hold_ms / 1000)
            sub.start()
            if not sub.subscribed.wait(10):
                raise RuntimeError(f"no SUBACK within 10 s: {sub.error}")
            assert broker.proc is not None
            before = _written(broker.proc.pid)
            t0 = time.time()
            with WirePool(f"mqtt://127.0.0.1:{broker.port}", connections=2, client_id="inflight-probe-pub") as pool:
                for _ in range(messages):
                    pool.publish(TOPIC, PAYLOAD)
                pool.wait_acked(300)
            sub.join(600)
            if sub.error is not None:
                raise sub.error
            return Probe(
                window=window,
                hold_ms=hold_ms,
                messages=messages,
                received=sub.received,
                max_unacked=sub.max_unacked,
                seconds=round(sub.last_at - t0, 3),
                mosquitto_written_mb=round((_written(broker.proc.pid) - before) / 1e6, 1),
            )
        finally:
            broker.stop()


def render(version: str, probes: list[Probe]) -> str:
    lines = [
        f"# Mosquitto's in-flight window — {datetime.now(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}",
        "",
        f"{version}; a persistent session that acknowledges each message the hold time after it arrived; "
        f"{probes[0].messages:,} QoS 1 messages of {len(PAYLOAD)} bytes published as fast as the broker takes "
        "them, over two connections; saves after every 100 changes.",
        "",
        "| max_inflight_messages | hold (ms) | most held unacknowledged | received | seconds | Mosquitto wrote (MB) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in probes:
        lines.append(
            f"| {p.window:,} | {p.hold_ms:g} | {p.max_unacked:,} | {p.received:,} | {p.seconds} "
            f"| {p.mosquitto_written_mb} |"
        )
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--windows", default="10,1000", help="max_inflight_messages values, comma-separated")
    ap.add_argument(
        "--holds-ms", default="0,20,100", help="how long the subscriber holds each message, comma-separated"
    )
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    a = ap.parse_args()
    probes = []
    for w in (int(x) for x in a.windows.split(",")):
        for hold in (float(x) for x in a.holds_ms.split(",")):
            p = probe(w, a.messages, hold)
            print(json.dumps(asdict(p)), flush=True)
            probes.append(p)
    found = mosquitto_version(find_mosquitto() or "mosquitto")
    version = "Mosquitto " + (".".join(map(str, found)) if found else "(version unknown)")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    a.out_dir.mkdir(parents=True, exist_ok=True)
    (a.out_dir / f"mqtt-inflight-{stamp}.json").write_text(
        json.dumps({"mosquitto": version, "probes": [asdict(p) for p in probes]}, indent=1)
    )
    md = render(version, probes)
    (a.out_dir / f"mqtt-inflight-{stamp}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
