"""``conflicting_reading``: the same (device, metric, ts) accepted before with another value
is refused with its own code (storage keeps one value per key: the second would vanish
silently); an exact repeat is dropped idempotently. Table-driven on ingest's pure pipeline."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from ingest.dedup import SeqMemory, ValueMemory
from ingest.pipeline import Outcome, handle, remember, screen_conflicts, screen_duplicates
from pilotlab.contracts import Limits, Reason, telemetry_topic
from pilotlab.manifest import load_manifests
from pilotlab.registry import Registry

ROOT = Path(__file__).resolve().parents[2]
REGISTRY = Registry.of(load_manifests(ROOT / "control" / "examples" / "experiments"))
NOW_MS = 1_773_576_000_000
TS = NOW_MS - 30_000
TOPIC = telemetry_topic("lez-san-salvario", "aq-lez-01")
LIMITS = Limits(max_payload_bytes=256 * 1024, max_batch=500)


class Ingest:
    """The service's per-message screening, on its two memories."""

    def __init__(self) -> None:
        self.seqs, self.values = SeqMemory(), ValueMemory(per_device=4)

    def send(self, doc: object) -> tuple[Outcome, int]:
        payload = orjson.dumps(doc)
        out = handle(TOPIC, payload, NOW_MS, REGISTRY, LIMITS)
        screen_duplicates(out, self.seqs, TOPIC, payload)
        found = screen_conflicts(out, self.values, TOPIC, payload)
        remember(out, self.seqs, "hand-off", self.values)
        return out, found.repeats


def item(seq: int, ts: int = TS, **metrics: float) -> dict:
    return {"seq": seq, "ts": ts, "metrics": metrics}


def reasons(out: Outcome) -> list[tuple[str, int | None]]:
    return [(str(r.reason), r.item_index) for r in out.rejections]


def test_500_items_at_one_instant_keep_one_and_refuse_every_other_value() -> None:
    out, repeats = Ingest().send([item(i, no2=40.0 + i % 7) for i in range(500)])
    assert [(r.ts_ms, r.metrics) for r in out.batch.readings] == [(TS, {"no2": 40.0})]
    refused = [i for reason, i in reasons(out) if reason == "conflicting_reading"]
    assert refused == [i for i in range(500) if i % 7]  # every other value, each item by index
    assert repeats == sum(1 for i in range(1, 500) if i % 7 == 0)  # the same value again: dropped
    assert len(out.batch.readings) + len(refused) + repeats == 500  # nothing unaccounted for
    assert "no2 41.0 (accepted before: 40.0)" in out.rejections[0].detail


@pytest.mark.parametrize(
    ("first", "second", "kept", "refused", "repeats"),
    [
        (item(1, no2=40.0), item(2, no2=40.0), [], [], 1),  # exact repeat, new seq: idempotent
        (item(1, no2=40.0), item(2, no2=41.0), [], [("conflicting_reading", None)], 0),
        (item(1, no2=40.0), item(2, no2=41.0, pm25=9.0), [{"pm25": 9.0}], [("conflicting_reading", None)], 0),
        (item(1, no2=40.0), item(2, ts=TS + 1, no2=41.0), [{"no2": 41.0}], [], 0),  # another instant
        (item(1, no2=40.0), item(1, no2=41.0), [], [("duplicate", None)], 0),  # same seq: duplicate first
    ],
)
def test_across_messages(first, second, kept, refused, repeats) -> None:
    ingest = Ingest()
    ingest.send(first)
    out, n = ingest.send(second)
    assert ([r.metrics for r in out.batch.readings] if out.batch else []) == kept
    assert reasons(out) == refused
    assert n == repeats


def test_senml_resend_with_another_value_is_a_conflict() -> None:
    ingest = Ingest()
    pack = [{"bn": "urn:dev:aq-lez-01:", "bt": TS / 1000, "n": "no2", "v": 38.2}]
    assert ingest.send(pack)[0].batch is not None
    out, repeats = ingest.send(pack)  # SenML has no seq: the repeat is caught by its value
    assert out.batch is None and repeats == 1 and out.rejections == []
    pack[0]["v"] = 39.0
    out, _ = ingest.send(pack)
    assert reasons(out) == [("conflicting_reading", None)]


def test_memory_is_bounded_per_device() -> None:
    ingest = Ingest()  # remembers 4 instants per device
    for k in range(6):
        ingest.send(item(k, ts=TS + k, no2=40.0))
    out, _ = ingest.send(item(10, ts=TS, no2=99.0))  # forgotten: forwarded (storage keeps the first)
    assert out.rejections == [] and out.batch is not None
    out, _ = ingest.send(item(11, ts=TS + 5, no2=99.0))  # still remembered
    assert reasons(out) == [("conflicting_reading", None)]


def test_conflict_waits_for_the_hand_off_of_the_accepted_value() -> None:
    values = ValueMemory()
    payload = orjson.dumps(item(1, no2=40.0))
    out = handle(TOPIC, payload, NOW_MS, REGISTRY, LIMITS)
    remember(out, SeqMemory(), "first hand-off", values)
    payload = orjson.dumps(item(2, no2=41.0))
    out = handle(TOPIC, payload, NOW_MS, REGISTRY, LIMITS)
    assert screen_conflicts(out, values, TOPIC, payload).tokens == ["first hand-off"]
    assert Reason.CONFLICTING_READING == "conflicting_reading"
