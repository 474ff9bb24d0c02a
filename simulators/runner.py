"""Run a scenario against an MQTT broker: plan, pace, publish, and return the ground truth.

The run's anchor (the end of the simulated window) is the wall-clock time at which the last
reading is due: ``now + lead + span / speed``, rounded up to the second. So in live mode
(``speed`` 1) the readings are taken "now", and accelerated the window ends when the run ends.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pilotlab.contracts import Limits, utcnow
from pilotlab.manifest import Experiment
from simulators.engine import MqttPool, SendStats, send
from simulators.faults import GroundTruth, Run
from simulators.replay import RecordingWriter
from simulators.spec import Scenario

__all__ = ["default_anchor", "run_scenario"]


def default_anchor(scenario: Scenario, speed: float, lead_s: float = 3.0, now: datetime | None = None) -> datetime:
    now = utcnow() if now is None else now
    end = now + timedelta(seconds=lead_s + scenario.span().total_seconds() / speed)
    return datetime.fromtimestamp(math.ceil(end.timestamp()), tz=UTC)  # whole seconds


def run_scenario(
    scenario: Scenario,
    mqtt_url: str,
    *,
    speed: float | None = None,
    anchor: datetime | None = None,
    limits: Limits | None = None,
    before_start: Callable[[list[Experiment]], None] | None = None,
    out_dir: Path | None = None,
    connections: int = 4,
    progress: Callable[[int, int | None], None] | None = None,
    username: str | None = None,
    password: str | None = None,
) -> tuple[GroundTruth, SendStats]:
    """Publish the scenario; ``before_start`` gets the anchored experiments first (register
    them there). With ``out_dir``, writes ``messages.jsonl`` (a recording ``pilotlab replay``
    can play) and the ground truth beside it."""
    speed = float(speed if speed is not None else scenario.speed)
    anchor = anchor if anchor is not None else default_anchor(scenario, speed)
    run = Run(scenario, anchor, speed=speed, limits=limits)
    if before_start is not None:
        before_start(run.experiments)
    wall_start = anchor - timedelta(seconds=run.wall_duration_s())
    start = time.monotonic() + (wall_start - utcnow()).total_seconds()
    writer = RecordingWriter(out_dir / "messages.jsonl", started=wall_start, topics=["pilots/#"]) if out_dir else None

    def due():
        for m in run.messages():
            t = run.wall_offset_s(m.send_ms)
            if writer is not None:
                writer.write(t, m.topic, m.payload)
            yield t, m.topic, m.payload

    try:
        with MqttPool(mqtt_url, connections=connections, username=username, password=password) as pool:
            stats = send(pool, due(), start=start, progress=progress)
    finally:
        if writer is not None:
            writer.close()
    if out_dir is not None:
        run.truth.write(out_dir)
    if stats.max_lag_s * 1000 > run.lag_allowance_ms:
        raise RuntimeError(
            f"the run fell {stats.max_lag_s:.1f} s behind schedule (allowed {run.lag_allowance_ms / 1000:.0f} s): "
            "timestamp verdicts in the ground truth may not hold; lower the speed"
        )
    return run.truth, stats


def plan_to_files(
    scenario: Scenario, out_dir: Path, *, speed: float | None = None, anchor: datetime | None = None,
    limits: Limits | None = None,
) -> GroundTruth:
    """No broker: write the messages as a recording and the ground truth (``--dry-run``)."""
    speed = float(speed if speed is not None else scenario.speed)
    anchor = anchor if anchor is not None else default_anchor(scenario, speed)
    run = Run(scenario, anchor, speed=speed, limits=limits)
    wall_start = anchor - timedelta(seconds=run.wall_duration_s())
    writer = RecordingWriter(out_dir / "messages.jsonl", started=wall_start, topics=["pilots/#"])
    try:
        for m in run.messages():
            writer.write(run.wall_offset_s(m.send_ms), m.topic, m.payload)
    finally:
        writer.close()
    run.truth.write(out_dir)
    return run.truth
