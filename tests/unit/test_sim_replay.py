"""Recordings: the file format round-trips; the time shift moves every ts and nothing else;
the replay schedule keeps file order and divides the timings by the speed."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from simulators.replay import (
    Recording,
    RecordingError,
    RecordingWriter,
    read_recording,
    replay_schedule,
    shift_payload,
)

STARTED = datetime(2026, 3, 16, 8, 0, tzinfo=UTC)


def test_round_trip_text_and_binary_payloads(tmp_path):
    path = tmp_path / "r.jsonl"
    w = RecordingWriter(path, started=STARTED, topics=["pilots/#"])
    w.write(0.0, "pilots/a/d/telemetry", b'{"seq": 1}')
    w.write(0.25, "pilots/a/d/telemetry", b"\xff\xfe not utf-8")
    w.write(1.5, "pilots/a/d/telemetry", b'{"seq": ', qos=0)
    w.close()
    rec = read_recording(path)
    assert rec.started == STARTED and rec.topics == ("pilots/#",)
    assert [(m.t, m.payload, m.qos) for m in rec.messages] == [
        (0.0, b'{"seq": 1}', 1), (0.25, b"\xff\xfe not utf-8", 1), (1.5, b'{"seq": ', 0),
    ]


def test_bad_files_name_the_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"pilotlab_recording": 1, "started": "2026-03-16T08:00:00Z"}\n{"t": 1}\n')
    with pytest.raises(RecordingError, match=r"bad\.jsonl:2: not a recorded message"):
        read_recording(p)
    p.write_text('{"hello": 1}\n')
    with pytest.raises(RecordingError, match=r"bad\.jsonl:1: not a pilotlab recording header"):
        read_recording(p)


def test_shift_moves_iso_and_epoch_ms_timestamps():
    one = orjson.dumps({"seq": 1, "ts": "2026-03-16T08:00:00Z", "metrics": {"no2": 1.0}})
    assert orjson.loads(shift_payload(one, 3_600_000))["ts"] == "2026-03-16T09:00:00Z"
    batch = orjson.dumps(
        [{"seq": 1, "ts": 1_773_648_000_000, "metrics": {}}, {"seq": 2, "ts": "2026-03-16T08:00:00+00:00"}]
    )
    a, b = orjson.loads(shift_payload(batch, -1000))
    assert a["ts"] == 1_773_647_999_000 and b["ts"] == "2026-03-16T07:59:59+00:00"


@pytest.mark.parametrize(
    "payload",
    [b'{"seq": 1, "ts": ', b'{"seq": 1, "ts": "yesterday"}', b"42", b'{"ts": "2026-03-16T08:00:00"}', b'[1, "x"]'],
)
def test_shift_leaves_what_it_cannot_read_byte_for_byte(payload):
    assert shift_payload(payload, 86_400_000) == payload


@given(st.lists(st.floats(min_value=0, max_value=1e5, allow_nan=False), max_size=50),
       st.floats(min_value=0.01, max_value=1e4))
def test_schedule_keeps_order_and_scales_time(ts, speed):
    from simulators.replay import Recorded  # noqa: PLC0415

    ts = sorted(ts)
    rec = Recording(STARTED, (), tuple(Recorded(t, f"pilots/e/d{i}/telemetry", b"{}") for i, t in enumerate(ts)))
    sched = list(replay_schedule(rec, speed))
    assert [s[1] for s in sched] == [m.topic for m in rec.messages]
    assert all(due == pytest.approx(t / speed) for (due, _, _), t in zip(sched, ts, strict=True))

