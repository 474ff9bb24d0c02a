"""Ingest's ``duplicate`` check: bounded memory of (device, seq), and the pipeline step."""

from __future__ import annotations

from pathlib import Path

import orjson
from hypothesis import given
from hypothesis import strategies as st

from ingest.dedup import SeqMemory
from ingest.pipeline import handle, remember, screen_duplicates
from pilotlab.contracts import Limits, Reason, telemetry_topic
from pilotlab.manifest import load_manifests
from pilotlab.registry import Registry

ROOT = Path(__file__).resolve().parents[2]
REGISTRY = Registry.of(load_manifests(ROOT / "control" / "examples" / "experiments"))
NOW_MS = 1_773_576_000_000
TOPIC = telemetry_topic("lez-san-salvario", "aq-lez-01")
LIMITS = Limits()


def msg(*seqs: int) -> bytes:
    items = [{"seq": s, "ts": NOW_MS - 1000 * s, "metrics": {"no2": 40.0}} for s in seqs]
    return orjson.dumps(items[0] if len(items) == 1 else items)


def ingest(memory: SeqMemory, payload: bytes, token: object = "t"):
    out = handle(TOPIC, payload, NOW_MS, REGISTRY, LIMITS)
    tokens = screen_duplicates(out, memory, TOPIC, payload)
    remember(out, memory, token)
    return out, tokens


def test_a_resent_seq_is_refused_as_duplicate_with_the_first_token() -> None:
    memory = SeqMemory()
    first, tokens = ingest(memory, msg(1, 2), token="first")
    assert tokens == [] and [r.seq for r in first.batch.readings] == [1, 2]
    again, tokens = ingest(memory, msg(2, 3), token="second")
    assert [r.seq for r in again.batch.readings] == [3]
    assert [(r.reason, r.item_index) for r in again.rejections] == [(Reason.DUPLICATE, 0)]
    assert again.rejections[0].device_id == "aq-lez-01"
    assert tokens == ["first"]


def test_the_same_seq_twice_in_one_message() -> None:
    out, tokens = ingest(SeqMemory(), msg(5, 5, 6))
    assert [r.seq for r in out.batch.readings] == [5, 6]
    assert out.indexes == [0, 2]
    assert [(r.reason, r.item_index) for r in out.rejections] == [(Reason.DUPLICATE, 1)]
    assert tokens == []


def test_a_message_of_only_duplicates_forwards_nothing() -> None:
    memory = SeqMemory()
    ingest(memory, msg(7))
    out, _ = ingest(memory, msg(7))
    assert out.batch is None
    assert [r.reason for r in out.rejections] == [Reason.DUPLICATE]
    assert out.rejections[0].item_index is None  # a single object


def test_senml_readings_are_not_screened_by_seq() -> None:
    memory = SeqMemory()
    pack = orjson.dumps([{"n": "no2", "v": 1, "t": -5}])
    for _ in range(2):
        out, _ = ingest(memory, pack)
        assert out.batch is not None and out.rejections == []
    assert len(memory) == 0


def test_memory_is_bounded_per_device_and_in_devices() -> None:
    memory = SeqMemory(per_device=3, max_devices=2)
    for seq in range(10):
        memory.remember("a", seq)
    assert len(memory) == 3
    assert not memory.lookup("a", 6)[0] and memory.lookup("a", 7)[0]
    memory.remember("b", 1)
    memory.remember("a", 10)  # a is now the most recently active
    memory.remember("c", 1)  # forgets b, the least recently active
    assert memory.devices() == 2
    assert not memory.lookup("b", 1)[0] and memory.lookup("a", 10)[0] and memory.lookup("c", 1)[0]


@given(st.lists(st.tuples(st.sampled_from("abcde"), st.integers(0, 50)), max_size=300))
def test_memory_never_exceeds_its_bound_and_remembers_the_latest(ops) -> None:
    memory = SeqMemory(per_device=8, max_devices=3)
    for device, seq in ops:
        memory.remember(device, seq, (device, seq))
        assert memory.lookup(device, seq)[0]
        assert len(memory) <= 8 * 3 and memory.devices() <= 3
