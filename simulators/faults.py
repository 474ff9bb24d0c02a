"""Turn a scenario into the MQTT messages to send, with faults, and the ground truth. Pure.

:func:`plan` is deterministic for ``(scenario, anchor, speed, limits)``: no wall clock, no
global random state. It walks the devices' samples in time order and decides, with one
random stream per fault (each draws exactly one number per reading, so the rates are
independent of each other and of which faults are on):

* **outage** / **dropout**: the reading is never sent (lost in the street);
* **clock skew**: the device's ``ts`` is off by ``offset`` (stored as sent, or refused by
  ingest's timestamp window);
* **malformed**: the reading is replaced by a broken payload with a known reason code
  (:func:`simulators.publisher.broken_payload`);
* **bursts**: the device buffers ``size`` readings and sends them as one JSON array;
* **late**: the message is sent ``delay`` after its readings were taken;
* **out of order**: the message is held back by up to ``max_delay``, so later ones overtake it;
* **duplicates**: the same bytes are sent again shortly after.

**Ground truth.** What ingest must store: every reading of a valid item, keyed by the natural
key (device, metric, ts), duplicates once. What it must refuse and why, keyed like the
``rejections`` table (topic, payload, item index, reason), so a message sent twice is counted
once: broken payloads; timestamps outside ingest's window; and the repeated copy of a
duplicated message (``duplicate``, from ingest's per-device ``seq`` memory).

Timestamps are judged with ingest's own rule and :class:`pilotlab.contracts.Limits` against the
time the message *reaches* ingest: in a run anchored at ``anchor`` at ×``speed``, simulated
time ``t`` is sent at wall time ``anchor + (t - anchor) / speed``. A message whose verdict
would change if it arrived up to ``lag_allowance_ms`` later (or ``early_ms`` earlier) is
not sent at all and counted as ``skipped_ambiguous``, so the truth never depends on timing.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import orjson

from pilotlab.contracts import Limits, Reason, telemetry_topic, to_ms
from pilotlab.manifest import Experiment
from simulators.models import Sample, derive_seed, simulate_experiment
from simulators.publisher import broken_payload
from simulators.spec import Scenario

__all__ = ["GroundTruth", "Message", "Run", "plan", "receive_ms"]

# a duplicate copy follows its original within this much simulated time
_DUPLICATE_GAP_MS = 5_000


@dataclass(frozen=True, slots=True)
class Message:
    """One MQTT message: when to send it (simulated ms), where, what, and what should happen."""

    send_ms: int
    topic: str
    payload: bytes
    stored: tuple[tuple[str, str, int, float], ...] = ()  # (device, metric, ts_ms, value)
    rejected: tuple[tuple[int | None, Reason], ...] = ()  # (item index, reason)
    fault: str | None = None


def rejection_key(topic: str, payload: bytes, index: int | None, reason: Reason) -> str:
    """The same key as :meth:`pilotlab.contracts.Rejection.make_id`: one row per distinct refusal."""
    from pilotlab.contracts import Rejection  # noqa: PLC0415

    return Rejection.make_id(topic, payload, index, str(reason))


@dataclass
class GroundTruth:
    """What the pipeline should end up with, built as the messages are planned."""

    scenario: str = ""
    seed: int = 0
    anchor_ms: int = 0
    speed: float = 1.0
    experiments: list[Experiment] = field(default_factory=list)
    stored: dict[tuple[str, str, int], float] = field(default_factory=dict)
    rejected: dict[str, tuple[str, Reason]] = field(default_factory=dict)  # key → (experiment, reason)
    faults: Counter = field(default_factory=Counter)
    readings_generated: int = 0  # samples the devices took (before any fault)
    messages: int = 0

    def true_effects(self) -> dict[str, dict[str, float]]:
        return {e.id: dict(e.simulation.true_effects) if e.simulation else {} for e in self.experiments}

    def rejected_by_reason(self, experiment_id: str | None = None) -> Counter:
        return Counter(
            str(reason) for exp, reason in self.rejected.values() if experiment_id in (None, exp)
        )

    def stored_for(self, experiment: Experiment | str) -> dict[tuple[str, str, int], float]:
        exp = experiment if isinstance(experiment, Experiment) else self.experiment(experiment)
        ids = {d.id for d in exp.devices}
        return {k: v for k, v in self.stored.items() if k[0] in ids}

    def experiment(self, experiment_id: str) -> Experiment:
        return next(e for e in self.experiments if e.id == experiment_id)

    def summary(self) -> dict:
        return {
            "scenario": self.scenario,
            "seed": self.seed,
            "anchor": datetime.fromtimestamp(self.anchor_ms / 1000, tz=UTC).isoformat(),
            "speed": self.speed,
            "messages": self.messages,
            "readings_generated": self.readings_generated,
            "datapoints_stored": len(self.stored),
            "rejections": dict(sorted(self.rejected_by_reason().items())),
            "faults": dict(sorted(self.faults.items())),
            "true_effects": self.true_effects(),
            "experiments": [e.model_dump(mode="json") for e in self.experiments],
        }

    def write(self, directory: Path) -> None:
        """``truth.json`` (summary, true effects, anchored manifests), ``truth-stored.jsonl``
        (one line per datapoint that should be stored) and ``truth-rejected.jsonl``."""
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "truth.json").write_bytes(orjson.dumps(self.summary(), option=orjson.OPT_INDENT_2))
        with (directory / "truth-stored.jsonl").open("wb") as fh:
            for (device, metric, ts), value in sorted(self.stored.items()):
                fh.write(orjson.dumps({"device": device, "metric": metric, "ts_ms": ts, "value": value}) + b"\n")
        with (directory / "truth-rejected.jsonl").open("wb") as fh:
            for key, (exp, reason) in sorted(self.rejected.items()):
                fh.write(orjson.dumps({"rejection_id": key, "experiment": exp, "reason": str(reason)}) + b"\n")


def receive_ms(send_ms: int, anchor_ms: int, speed: float) -> int:
    """The wall-clock time at which a message sent at simulated ``send_ms`` reaches ingest."""
    return anchor_ms + round((send_ms - anchor_ms) / speed)


def _iso(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000, tz=UTC).isoformat().replace("+00:00", "Z")


def _item(s: Sample) -> dict:
    return {"seq": s.seq, "ts": _iso(s.ts_ms) if s.seq % 2 == 0 else s.ts_ms, "metrics": s.metrics}


def _encode(samples: list[Sample]) -> bytes:
    if len(samples) == 1:
        return orjson.dumps(_item(samples[0]))
    return orjson.dumps([_item(s) for s in samples])


def _share(seed: int, what: str, device_id: str) -> float:
    """A per-device uniform number in [0, 1) (to pick a share of devices deterministically)."""
    return derive_seed(seed, what, device_id) / 2**64


@dataclass
class _Device:
    exp_id: str
    topic: str
    skew_ms: int = 0
    buffer: list[Sample] = field(default_factory=list)
    burst_left: int = 0
    outages: list[tuple[int, int]] = field(default_factory=list)


class Run:
    """A planned run: iterate :meth:`messages` (in sending order) and read :attr:`truth`,
    which is complete once the iteration ends."""

    def __init__(
        self,
        scenario: Scenario,
        anchor: datetime,
        *,
        speed: float | None = None,
        limits: Limits | None = None,
        lag_allowance_ms: int = 30_000,
        early_ms: int = 2_000,
    ) -> None:
        if anchor.tzinfo is None:
            raise ValueError("anchor must be timezone-aware")
        self.scenario = scenario
        self.speed = float(speed if speed is not None else scenario.speed)
        if self.speed < 1.0:
            raise ValueError("speed must be at least 1 (live)")
        self.anchor_ms = to_ms(anchor)
        self.limits = limits if limits is not None else scenario.ingest.limits()
        self.lag_allowance_ms = lag_allowance_ms
        self.early_ms = early_ms
        self.experiments = scenario.anchored(anchor)
        self.start_ms = self.anchor_ms - int(scenario.span().total_seconds() * 1000)
        self.truth = GroundTruth(
            scenario=scenario.name,
            seed=scenario.seed,
            anchor_ms=self.anchor_ms,
            speed=self.speed,
            experiments=self.experiments,
        )

    # --- timing -------------------------------------------------------------------------

    def wall_offset_s(self, send_ms: int) -> float:
        """Seconds after the run's wall-clock start at which ``send_ms`` is due."""
        return (send_ms - self.start_ms) / 1000.0 / self.speed

    def wall_duration_s(self) -> float:
        return (self.anchor_ms - self.start_ms) / 1000.0 / self.speed

    # --- planning -------------------------------------------------------------------------

    def _devices(self) -> dict[str, _Device]:
        f = self.scenario.faults
        seed = self.scenario.seed
        all_ids = [d.id for e in self.experiments for d in e.devices]
        out: dict[str, _Device] = {}
        for exp in self.experiments:
            for d in exp.devices:
                dev = _Device(exp.id, telemetry_topic(exp.id, d.id))
                if f.clock_skew is not None and _share(seed, "skew", d.id) < f.clock_skew.devices:
                    dev.skew_ms = f.clock_skew.offset * 1000
                out[d.id] = dev
        for n, outage in enumerate(f.dropout.outages):
            if isinstance(outage.devices, tuple):
                unknown = sorted(set(outage.devices) - set(all_ids))
                if unknown:
                    raise ValueError(f"faults.dropout.outages.{n}.devices: unknown devices {', '.join(unknown)}")
                chosen = outage.devices
            else:
                chosen = tuple(i for i in all_ids if _share(seed, f"outage-{n}", i) < outage.devices)
            begin = self.start_ms + outage.start * 1000
            for i in chosen:
                out[i].outages.append((begin, begin + outage.duration * 1000))
        return out

    def _samples(self) -> Iterator[Sample]:
        seed = self.scenario.seed
        streams = [
            simulate_experiment(
                e,
                seed,
                start=datetime.fromtimestamp(self.start_ms / 1000, tz=UTC),
                end=datetime.fromtimestamp(self.anchor_ms / 1000, tz=UTC),
            )
            for e in self.experiments
        ]
        return heapq.merge(*streams, key=lambda s: s.ts_ms)

    def _uncertain(self, ts_ms: int, send_ms: int) -> tuple[Reason | None, bool]:
        now = receive_ms(send_ms, self.anchor_ms, self.speed)
        verdict = self.limits.ts_verdict(ts_ms, now)
        early = self.limits.ts_verdict(ts_ms, now - self.early_ms)
        late = self.limits.ts_verdict(ts_ms, now + self.lag_allowance_ms)
        return verdict, not (verdict == early == late)

    def messages(self) -> Iterator[Message]:
        f = self.scenario.faults
        seed = self.scenario.seed
        truth = self.truth
        devices = self._devices()
        rng = {
            name: random.Random(derive_seed(seed, "faults", name))
            for name in ("dropout", "malformed", "burst", "late", "ooo", "dup", "extra")
        }
        batch = self.scenario.batch
        pending: list[tuple[int, int, Message]] = []
        counter = 0

        def schedule(msg: Message) -> None:
            nonlocal counter
            heapq.heappush(pending, (msg.send_ms, counter, msg))
            counter += 1

        def emit(dev: _Device, samples: list[Sample], send_ms: int, fault: str | None) -> None:
            u_late, u_ooo, u_dup = rng["late"].random(), rng["ooo"].random(), rng["dup"].random()
            if f.late is not None and u_late < f.late.rate:
                send_ms += f.late.delay * 1000
                truth.faults["late"] += 1
                fault = fault or "late"
            if f.out_of_order is not None and u_ooo < f.out_of_order.rate:
                send_ms += rng["extra"].randint(1000, f.out_of_order.max_delay * 1000)
                truth.faults["out_of_order"] += 1
                fault = fault or "out_of_order"
            payload = _encode(samples)
            stored, rejected = [], []
            for index, s in enumerate(samples):
                verdict, uncertain = self._uncertain(s.ts_ms, send_ms)
                if uncertain:
                    truth.faults["skipped_ambiguous"] += 1
                    return
                item = None if len(samples) == 1 else index
                if verdict is None:
                    stored.extend((s.device_id, m, s.ts_ms, v) for m, v in s.metrics.items())
                else:
                    rejected.append((item, verdict))
            msg = Message(send_ms, dev.topic, payload, tuple(stored), tuple(rejected), fault)
            schedule(msg)
            if f.duplicates and u_dup < f.duplicates:
                truth.faults["duplicates"] += 1
                # ingest's seq memory refuses each reading the original already delivered
                again = tuple((None if len(samples) == 1 else i, Reason.DUPLICATE) for i in range(len(samples))
                              if not any(r[0] == (None if len(samples) == 1 else i) for r in rejected))
                gap = rng["extra"].randint(1, _DUPLICATE_GAP_MS)
                schedule(Message(send_ms + gap, dev.topic, payload, (), tuple(rejected) + again, "duplicate"))

        def flush(dev: _Device, send_ms: int, fault: str | None = None) -> None:
            if dev.buffer:
                emit(dev, dev.buffer, send_ms, fault)
                dev.buffer = []

        def release(upto_ms: int) -> Iterator[Message]:
            while pending and pending[0][0] <= upto_ms:
                msg = heapq.heappop(pending)[2]
                truth.messages += 1
                for device, metric, ts, value in msg.stored:
                    truth.stored[(device, metric, ts)] = value
                exp_id = msg.topic.split("/")[1]
                for index, reason in msg.rejected:
                    truth.rejected[rejection_key(msg.topic, msg.payload, index, reason)] = (exp_id, reason)
                yield msg

        for sample in self._samples():
            yield from release(sample.ts_ms)
            truth.readings_generated += 1
            dev = devices[sample.device_id]
            # one draw per reading and fault, whatever happens next: rates stay independent
            u_drop, u_bad, u_burst = rng["dropout"].random(), rng["malformed"].random(), rng["burst"].random()
            if any(a <= sample.ts_ms < b for a, b in dev.outages):
                truth.faults["outage"] += 1
                continue
            if u_drop < f.dropout.rate:
                truth.faults["dropout"] += 1
                continue
            sent = sample
            if dev.skew_ms:
                truth.faults["clock_skew"] += 1
                sent = Sample(sample.device_id, sample.seq, sample.ts_ms + dev.skew_ms, sample.metrics)
            if u_bad < f.malformed:
                payload, reason = broken_payload(sent, rng["extra"])
                if reason in (Reason.WRONG_TYPE, Reason.VALUE_OUT_OF_RANGE):
                    # ingest checks the timestamp before the metrics
                    verdict, uncertain = self._uncertain(sent.ts_ms, sample.ts_ms)
                    if uncertain:
                        truth.faults["skipped_ambiguous"] += 1
                        continue
                    reason = verdict or reason
                truth.faults["malformed"] += 1
                schedule(Message(sample.ts_ms, dev.topic, payload, (), ((None, reason),), "malformed"))
                continue
            dev.buffer.append(sent)
            if dev.burst_left:
                dev.burst_left -= 1
                if dev.burst_left == 0:
                    flush(dev, sample.ts_ms, "burst")
                continue
            if f.bursts is not None and u_burst < f.bursts.rate:
                truth.faults["bursts"] += 1
                dev.burst_left = f.bursts.size - len(dev.buffer)
                if dev.burst_left <= 0:
                    dev.burst_left = 0
                    flush(dev, sample.ts_ms, "burst")
                continue
            if len(dev.buffer) >= batch:
                flush(dev, sample.ts_ms)
        last = self.anchor_ms
        for dev in devices.values():
            dev.burst_left = 0
            flush(dev, dev.buffer[-1].ts_ms - dev.skew_ms if dev.buffer else last)
        yield from release(2**62)


def plan(
    scenario: Scenario, anchor: datetime, *, speed: float | None = None, limits: Limits | None = None
) -> tuple[list[Message], GroundTruth]:
    """Every message of the run (in sending order) and the complete ground truth."""
    run = Run(scenario, anchor, speed=speed, limits=limits)
    messages = list(run.messages())
    return messages, run.truth


def digest(messages: list[Message]) -> str:
    """A fingerprint of a message stream (send time, topic, payload), for determinism checks."""
    h = hashlib.blake2b(digest_size=16)
    for m in messages:
        h.update(m.send_ms.to_bytes(8, "big", signed=True))
        h.update(m.topic.encode() + b"\0" + m.payload + b"\0")
    return h.hexdigest()
