"""Record MQTT traffic to JSONL with timings, and replay it at N× speed.

A recording is JSON Lines. The first line is a header::

    {"pilotlab_recording": 1, "started": "2026-03-16T08:00:00+00:00", "topics": ["pilots/#"]}

then one line per message, in arrival order, with ``t`` the seconds since ``started``::

    {"t": 0.1834, "topic": "pilots/lez/aq-01/telemetry", "payload": "{\\"seq\\": 1, ...}", "qos": 1}

(``payload_b64`` instead of ``payload`` when the bytes are not UTF-8). ``pilotlab simulate
--out DIR`` writes its messages in the same format, so a scenario run can be replayed.

Replay publishes the messages in file order, message *i* no earlier than ``t_i / speed``
after the start; an optional time shift moves every ``ts`` inside the JSON payloads (ISO
strings and epoch milliseconds) so an old recording is not refused as too old.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from pilotlab.contracts import utcnow

__all__ = [
    "Recorded",
    "Recording",
    "RecordingError",
    "RecordingWriter",
    "read_recording",
    "record",
    "replay",
    "replay_schedule",
    "shift_payload",
]


class RecordingError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Recorded:
    t: float
    topic: str
    payload: bytes
    qos: int = 1


@dataclass(frozen=True, slots=True)
class Recording:
    started: datetime
    topics: tuple[str, ...]
    messages: tuple[Recorded, ...]


class RecordingWriter:
    """Appends messages to a recording file (header first). Flushes every line."""

    def __init__(self, path: Path, *, started: datetime, topics: list[str]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: IO[bytes] = path.open("wb")
        header = {"pilotlab_recording": 1, "started": started.isoformat(), "topics": topics}
        self._fh.write(orjson.dumps(header) + b"\n")
        self.count = 0

    def write(self, t: float, topic: str, payload: bytes, qos: int = 1) -> None:
        line: dict = {"t": round(t, 6), "topic": topic}
        try:
            line["payload"] = payload.decode("utf-8")
        except UnicodeDecodeError:
            line["payload_b64"] = base64.b64encode(payload).decode()
        line["qos"] = qos
        self._fh.write(orjson.dumps(line) + b"\n")
        self.count += 1

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def read_recording(path: Path) -> Recording:
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise RecordingError(f"{path}: cannot read: {exc.strerror}") from exc
    if not lines:
        raise RecordingError(f"{path}: empty file; a recording starts with a header line")
    try:
        header = orjson.loads(lines[0])
        started = datetime.fromisoformat(header["started"])
        if header.get("pilotlab_recording") != 1 or started.tzinfo is None:
            raise ValueError
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        raise RecordingError(f"{path}:1: not a pilotlab recording header") from None
    messages = []
    for n, raw in enumerate(lines[1:], start=2):
        if not raw.strip():
            continue
        try:
            doc = orjson.loads(raw)
            payload = (
                doc["payload"].encode("utf-8") if "payload" in doc else base64.b64decode(doc["payload_b64"])
            )
            messages.append(Recorded(float(doc["t"]), str(doc["topic"]), payload, int(doc.get("qos", 1))))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise RecordingError(f"{path}:{n}: not a recorded message ({exc})") from None
    return Recording(started.astimezone(UTC), tuple(header.get("topics", ())), tuple(messages))


def _shift_ts(value: object, shift_ms: int) -> object:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value + shift_ms
    if isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value)
        except ValueError:
            return value
        if dt.tzinfo is None:
            return value
        out = (dt + timedelta(milliseconds=shift_ms)).astimezone(UTC).isoformat()
        return out.replace("+00:00", "Z") if value.endswith("Z") else out
    return value


def shift_payload(payload: bytes, shift_ms: int) -> bytes:
    """Move every reading's ``ts`` by ``shift_ms``. Payloads that are not JSON objects or
    arrays of objects (a malformed one, say) are returned unchanged, byte for byte."""
    if shift_ms == 0:
        return payload
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return payload
    items = doc if isinstance(doc, list) else [doc]
    changed = False
    for item in items:
        if isinstance(item, dict) and "ts" in item:
            new = _shift_ts(item["ts"], shift_ms)
            if new is not item["ts"]:
                item["ts"] = new
                changed = True
    return orjson.dumps(doc) if changed else payload


def replay_schedule(
    recording: Recording, speed: float, shift_ms: int = 0
) -> Iterator[tuple[float, str, bytes]]:
    """``(due seconds after the start, topic, payload)`` in file order."""
    if speed <= 0:
        raise ValueError("speed must be positive")
    for m in recording.messages:
        yield m.t / speed, m.topic, shift_payload(m.payload, shift_ms)


def replay(
    mqtt_url: str,
    path: Path,
    *,
    speed: float = 1.0,
    time_shift: timedelta | str | None = None,
    connections: int = 1,
    progress: Callable[[int, int | None], None] | None = None,
    username: str | None = None,
    password: str | None = None,
):
    """Publish a recording. ``time_shift``: a timedelta, or ``"auto"`` (now minus the
    recording's start, so the readings look as fresh as when they were recorded).
    One connection by default: file order is then kept across all topics."""
    from simulators.engine import MqttPool, send  # noqa: PLC0415

    recording = read_recording(path)
    if time_shift == "auto":
        shift = utcnow() - recording.started
    elif isinstance(time_shift, str):
        raise ValueError("time_shift is a timedelta or 'auto'")
    else:
        shift = time_shift or timedelta(0)
    shift_ms = int(shift.total_seconds() * 1000)
    with MqttPool(mqtt_url, connections=connections, client_id="pilotlab-replay", username=username,
                  password=password) as pool:
        return send(pool, replay_schedule(recording, speed, shift_ms), total=len(recording.messages),
                    progress=progress)


def record(
    mqtt_url: str,
    topics: list[str],
    out: Path,
    *,
    duration: float | None = None,
    count: int | None = None,
    stop: threading.Event | None = None,
    ready: threading.Event | None = None,
    username: str | None = None,
    password: str | None = None,
) -> int:
    """Subscribe to ``topics`` (QoS 1) and write every message with its arrival time until
    ``duration`` seconds pass, ``count`` messages arrived or ``stop`` is set. ``ready`` is
    set once the broker acknowledged the subscriptions. Returns the number recorded."""
    from urllib.parse import unquote, urlparse  # noqa: PLC0415

    u = urlparse(mqtt_url)
    stop = stop or threading.Event()
    subscribed = threading.Event()
    lock = threading.Lock()
    started = utcnow()
    t0 = time.monotonic()
    writer = RecordingWriter(out, started=started, topics=topics)

    def on_connect(client, _u, _f, reason_code, _p) -> None:
        if not reason_code.is_failure:
            client.subscribe([(t, 1) for t in topics])

    def on_subscribe(_c, _u, _mid, _codes, _p) -> None:
        subscribed.set()
        if ready is not None:
            ready.set()

    def on_message(_c, _u, msg: mqtt.MQTTMessage) -> None:
        with lock:
            writer.write(time.monotonic() - t0, msg.topic, msg.payload, msg.qos)
            if count is not None and writer.count >= count:
                stop.set()

    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"pilotlab-record-{id(out)}")
    user = unquote(u.username) if u.username else username
    if user is not None:
        client.username_pw_set(user, unquote(u.password) if u.password else password)
    if u.scheme == "mqtts":
        client.tls_set()
    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    client.connect(u.hostname or "127.0.0.1", u.port or 1883)
    client.loop_start()
    try:
        stop.wait(duration)
    finally:
        client.disconnect()
        client.loop_stop()
        with lock:
            writer.close()
    return writer.count
