"""ingest.pack: several MQTT messages' batches of one experiment in one Kafka record."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.pack import Packer
from pilotlab.contracts import Reading, ReadingBatch, pack_batches


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_pack_goes_when_it_holds_its_messages() -> None:
    p = Packer(3, 10_000, 1.0, Clock())
    assert p.add(b"e", b"1", "m1") == []
    assert p.add(b"f", b"x", "n1") == []  # another experiment: its own pack
    assert p.add(b"e", b"2", "m2") == []
    [full] = p.add(b"e", b"3", "m3")
    assert (full.key, full.values, full.tickets) == (b"e", [b"1", b"2", b"3"], ["m1", "m2", "m3"])
    assert len(p) == 1  # f's message waits


def test_a_value_that_would_overflow_the_bytes_sends_the_pack_first() -> None:
    p = Packer(100, 10, 1.0, Clock())
    assert p.add(b"e", b"aaaa", 1) == []
    [first] = p.add(b"e", b"bbbbbb", 2)  # 5 + 7 > 10: the open pack goes as it is
    assert first.values == [b"aaaa"]
    [big] = p.add(b"f", b"c" * 50, 3)  # alone larger than a pack: goes at once, alone
    assert big.values == [b"c" * 50]
    assert [pk.values for pk in p.drain()] == [[b"bbbbbb"]]


def test_packs_are_due_after_their_wait_oldest_first() -> None:
    clock = Clock()
    p = Packer(100, 10_000, 0.02, clock)
    p.add(b"e", b"1", 1)
    clock.now = 0.01
    p.add(b"f", b"2", 2)
    assert p.due() == []
    assert p.wait_s(0.1) == pytest.approx(0.01)
    clock.now = 0.02
    assert [pk.key for pk in p.due()] == [b"e"]
    clock.now = 0.05
    assert [pk.key for pk in p.due()] == [b"f"]
    assert p.wait_s(0.1) == 0.1 and len(p) == 0


def test_settings_that_cannot_pack_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Packer(0, 10, 1.0, Clock())


batches = st.builds(
    ReadingBatch,
    st.just("exp"),
    st.sampled_from(["d1", "d2", "d3"]),
    st.sampled_from(["treatment", "control"]),
    st.integers(0, 2**41),
    st.lists(
        st.builds(
            Reading,
            st.integers(0, 2**31),
            st.integers(0, 2**41),
            st.dictionaries(st.sampled_from(["pm25", "no2"]), st.floats(-1e6, 1e6), min_size=1),
        ),
        min_size=1,
        max_size=4,
    ).map(tuple),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(batches, min_size=1, max_size=30), st.integers(1, 8), st.integers(64, 2048))
def test_every_batch_reaches_a_record_once_in_order_and_decodes_as_it_was(bs, max_messages, max_bytes) -> None:
    p = Packer(max_messages, max_bytes, 1.0, Clock())
    records = []
    for i, b in enumerate(bs):
        records += p.add(b"exp", b.to_json(), i)
    records += p.drain()
    assert [t for r in records for t in r.tickets] == list(range(len(bs)))  # once each, in order
    assert all(len(r.values) <= max_messages for r in records)
    assert all(r.size <= max_bytes or len(r.values) == 1 for r in records)
    assert [b for r in records for b in ReadingBatch.all_from_json(r.value())] == bs


def test_one_batch_is_packed_as_itself() -> None:
    b = ReadingBatch("e", "d", "control", 1, (Reading(1, 2, {"pm25": 3.0}),))
    assert pack_batches([b.to_json()]) == b.to_json()  # what a consumer before packing reads too
    assert ReadingBatch.all_from_json(pack_batches([b.to_json(), b.to_json()])) == [b, b]
