"""The MQTT broker's acknowledgement window: how many QoS 1 messages that Mosquitto
acknowledged (PUBACK) to a device a kill -9 of Mosquitto loses, per persistence setting,
and what the setting costs.

Mosquitto keeps sessions and queued messages in memory and writes them to its persistence
file only when it autosaves (and at a clean shutdown). A kill -9 loses what it acknowledged
since the last save and had not delivered to ingest. Two cases, each repeated:

- **ingest away**: ingest's persistent session exists but is disconnected (a restart, a
  deploy); a device publishes ``--messages`` messages as fast as the broker takes them, and
  Mosquitto is killed right after the last PUBACK (the worst moment). Lost = messages the
  session never receives after the restart. Cost = the publish rate while queueing (every
  save writes the whole queue and fsyncs it).
- **ingest attached**: the session is connected and takes every message at once (ingest
  keeping up); a device publishes at ``--rate`` msg/s and Mosquitto is killed mid-stream,
  then restarted; the device's client resends what was not acknowledged. Lost = messages
  acknowledged to the device and never delivered.

The subscriber uses a plain subscription (what ingest does with Mosquitto < 2.0.12, see
``control.stack.ingest_env``). Run: ``python bench/bench_mqtt_window.py [--messages 2000]``;
writes ``bench/results/mqtt-window-<UTC>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from control.stack import MQTT_AUTOSAVE_CHANGES, find_mosquitto, free_port, port_answers

RESULTS = Path(__file__).resolve().parent / "results"
TOPIC = "pilots/bench/dev/telemetry"
SETTINGS = [
    ("every 5 s (before)", ["autosave_interval 5"]),
    ("on changes: 1", ["autosave_on_changes true", "autosave_interval 1"]),
    ("on changes: 10", ["autosave_on_changes true", "autosave_interval 10"]),
    ("on changes: 100", ["autosave_on_changes true", "autosave_interval 100"]),
]


class Broker:
    def __init__(self, root: Path, lines: list[str], inflight: int = 1000) -> None:
        self.root, self.port = root, free_port()
        self.conf = root / "mosquitto.conf"
        user = os.environ.get("USER") or "root"
        self.conf.write_text(
            "\n".join(
                [
                    f"listener {self.port} 127.0.0.1",
                    "allow_anonymous true",
                    f"user {user}",
                    "persistence true",
                    f"persistence_location {root}/",
                    *lines,
                    "max_queued_messages 0",
                    "max_queued_bytes 0",
                    f"max_inflight_messages {inflight}",
                    "",
                ]
            )
        )
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [find_mosquitto(), "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while not port_answers(self.port):
            assert time.monotonic() < deadline, "mosquitto did not start"
            time.sleep(0.02)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()


def client(port: int, cid: str, clean: bool = True) -> mqtt.Client:
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=cid, clean_session=clean)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.reconnect_delay_set(min_delay=1, max_delay=1)
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c


class Subscriber:
    """ingest's persistent session, reduced to counting distinct payloads."""

    def __init__(self, port: int) -> None:
        self.port, self.got, self.lock = port, set(), threading.Lock()
        self.c: mqtt.Client | None = None

    def connect(self) -> None:
        """Like ingest: a persistent session that subscribes on every connect."""
        self.c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="ingest", clean_session=False)
        self.c.max_inflight_messages_set(1000)
        self.c.reconnect_delay_set(min_delay=1, max_delay=1)
        self.c.on_message = self._on_message
        subscribed = threading.Event()
        self.c.on_connect = lambda c, *_a: c.subscribe(TOPIC, qos=1)
        self.c.on_subscribe = lambda *_a: subscribed.set()
        self.c.connect("127.0.0.1", self.port)
        self.c.loop_start()
        subscribed.wait(5)

    def _on_message(self, _c, _u, msg) -> None:
        with self.lock:
            self.got.add(int(msg.payload))

    def disconnect(self) -> None:
        assert self.c is not None
        self.c.disconnect()
        self.c.loop_stop()


def wait_quiet(sub: Subscriber, seconds: float = 1.5, limit: float = 20.0) -> None:
    start, last, n = time.monotonic(), time.monotonic(), -1
    while time.monotonic() - start < limit:
        with sub.lock:
            now = len(sub.got)
        if now != n:
            n, last = now, time.monotonic()
        elif time.monotonic() - last > seconds:
            return
        time.sleep(0.1)


def ingest_away(lines: list[str], messages: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="mqtt-window-") as tmp:
        broker = Broker(Path(tmp), lines)
        broker.start()
        try:
            sub = Subscriber(broker.port)
            sub.connect()
            time.sleep(0.2)
            sub.disconnect()  # the session stays: Mosquitto queues for it
            pub = client(broker.port, "device")
            t = time.monotonic()
            infos = [pub.publish(TOPIC, str(i).encode(), qos=1) for i in range(messages)]
            for info in infos:
                info.wait_for_publish(60)
            rate = messages / (time.monotonic() - t)
            broker.kill()  # right after the last PUBACK
            pub.loop_stop()
            broker.start()
            sub = Subscriber(broker.port)
            sub.connect()  # the restored session, as ingest reconnects
            wait_quiet(sub)
            sub.disconnect()
            return {"acknowledged": messages, "lost": messages - len(sub.got), "publish_msg_s": round(rate)}
        finally:
            broker.stop()


def ingest_attached(lines: list[str], rate: float, seconds: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="mqtt-window-") as tmp:
        broker = Broker(Path(tmp), lines)
        broker.start()
        try:
            sub = Subscriber(broker.port)
            sub.connect()
            pub = client(broker.port, "device")
            acked: set[int] = set()
            mids: dict[int, int] = {}
            pub.on_publish = lambda _c, _u, mid, _rc, _p: acked.add(mids.get(mid, -1))
            n = int(rate * seconds)
            t0 = time.monotonic()
            killed = False
            for i in range(n):
                due = t0 + i / rate
                if not killed and time.monotonic() - t0 > seconds / 2:
                    broker.kill()
                    killed = True
                    threading.Timer(0.5, broker.start).start()
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                mids[pub.publish(TOPIC, str(i).encode(), qos=1).mid] = i
            deadline = time.monotonic() + 30
            while len(acked) < n and time.monotonic() < deadline:
                time.sleep(0.1)
            wait_quiet(sub)
            pub.disconnect()
            pub.loop_stop()
            sub.disconnect()
            lost = len(acked - sub.got)
            return {"acknowledged": len(acked), "lost": lost, "never_acknowledged": n - len(acked)}
        finally:
            broker.stop()


def markdown(res: dict) -> str:
    lines = [
        f"# MQTT acknowledgement window — {res['started_at']}",
        "",
        f"Mosquitto {res['mosquitto']}, {res['machine']}. Each case {res['repeats']}×; lost = "
        "acknowledged to the device (PUBACK) and never delivered to the persistent session.",
        "",
        f"| autosave | ingest away: lost of ~{res['messages']} (max / mean) | publish msg/s while queueing "
        f"| ingest attached: lost (max / mean) of ~{res['attached_messages']} |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, r in res["settings"].items():
        away, att = r["away"], r["attached"]
        lines.append(
            f"| {name} | {max(a['lost'] for a in away)} / {statistics.mean(a['lost'] for a in away):.1f} | "
            f"{statistics.median(a['publish_msg_s'] for a in away):,.0f} | "
            f"{max(a['lost'] for a in att)} / {statistics.mean(a['lost'] for a in att):.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=2000, help="queued while ingest is away")
    ap.add_argument("--rate", type=float, default=1000.0, help="msg/s while ingest is attached")
    ap.add_argument("--seconds", type=float, default=3.0, help="publishing time while attached")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--settings", help="comma-separated subset of the autosave settings' names")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    version = subprocess.run([find_mosquitto(), "-h"], capture_output=True, text=True, check=False).stdout
    res = {
        "started_at": datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "mosquitto": version.splitlines()[0].replace("mosquitto version ", "") if version else "?",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "messages": a.messages,
        "attached_messages": int(a.rate * a.seconds),
        "repeats": a.repeats,
        "stack_default": f"on changes: {MQTT_AUTOSAVE_CHANGES}",
        "settings": {},
    }
    for name, lines in SETTINGS:
        if a.settings and name not in a.settings.split(","):
            continue
        # a few counts per setting: where the kill falls between two saves varies
        away = [ingest_away(lines, a.messages + 7 * i) for i in range(a.repeats)]
        attached = [ingest_attached(lines, a.rate, a.seconds) for _ in range(a.repeats)]
        res["settings"][name] = {"lines": lines, "away": away, "attached": attached}
        print(
            name,
            "away:",
            [x["lost"] for x in away],
            [x["publish_msg_s"] for x in away],
            "attached:",
            [x["lost"] for x in attached],
            flush=True,
        )
    a.out_dir.mkdir(parents=True, exist_ok=True)
    stamp = res["started_at"].replace(":", "").replace("-", "")
    (a.out_dir / f"mqtt-window-{stamp}.json").write_text(json.dumps(res, indent=2))
    md = markdown(res)
    (a.out_dir / f"mqtt-window-{stamp}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
