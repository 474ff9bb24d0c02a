"""Record and replay on the real broker: ``pilotlab replay FILE --speed N --time-shift``
republishes in file order, each message within the stated tolerance of its scaled time,
with every ts moved by the shift; ``record`` captures what it subscribed to."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from datetime import UTC, datetime

import orjson
import pytest

from simulators.replay import RecordingWriter, read_recording, record

pytestmark = pytest.mark.integration

# the stated tolerance: a replayed message arrives within 150 ms of its scaled recorded time
# (relative to the first one), on a loaded 2-core machine
TOLERANCE_S = 0.15


def test_replay_keeps_order_and_timing_and_shifts_time(stack_state, tmp_path):
    source = tmp_path / "source.jsonl"
    w = RecordingWriter(source, started=datetime(2026, 3, 1, 8, tzinfo=UTC), topics=["pilots/#"])
    t = 0.0
    gaps = [0.0, 0.01, 0.4, 0.05, 0.8, 0.0, 0.3, 1.2, 0.02, 0.6] * 4
    for i, gap in enumerate(gaps):
        t += gap
        doc = {"seq": i, "ts": 1_772_352_000_000 + i * 1000, "metrics": {"noise": 50.0}}
        w.write(t, f"pilots/replay-it/dev{i % 3}/telemetry", orjson.dumps(doc))
    w.close()

    captured = tmp_path / "captured.jsonl"
    ready = threading.Event()
    recorder = threading.Thread(
        target=record, args=(stack_state.mqtt_url, ["pilots/replay-it/#"], captured),
        kwargs={"count": len(gaps), "duration": 120, "ready": ready},
    )
    recorder.start()
    try:
        assert ready.wait(30), "recorder did not subscribe"
        env = {**os.environ, **stack_state.env()}
        result = subprocess.run(
            [sys.executable, "-m", "control", "replay", str(source), "--speed", "2", "--time-shift", "1d", "-q"],
            env=env, capture_output=True, text=True, timeout=120, check=False,
        )
        assert result.returncode == 0, result.stderr
    finally:
        recorder.join(150)
    got = read_recording(captured).messages
    sent = read_recording(source).messages
    assert [m.topic for m in got] == [m.topic for m in sent]
    assert [orjson.loads(m.payload)["seq"] for m in got] == list(range(len(gaps)))
    assert [orjson.loads(m.payload)["ts"] for m in got] == [
        orjson.loads(m.payload)["ts"] + 86_400_000 for m in sent
    ]
    t0 = got[0].t
    errors = [abs((g.t - t0) - s.t / 2) for g, s in zip(got, sent, strict=True)]
    assert max(errors) < TOLERANCE_S, errors
