"""Chunks of messages and the state they leave behind: crash-safe without Kafka transactions.

The worker takes messages in chunks (Faust's ``take_events``). For the messages of one
partition it runs the engine on a working copy of the state (``Chunk``), then, in order:

1. sends the chunk's outputs (KPIs, late readings, device status changes) and waits until the
   broker has them;
2. writes every state key the chunk changed to the changelog, as an *entry* that holds the
   new value, the value before the chunk and the offset the chunk ends at;
3. writes, last, the partition's *mark*: the next offset to apply.

Offsets are committed only after all three. A kill can cut this sequence anywhere. After a
restart Faust restores the changelog and Kafka redelivers from the last committed offset
(never beyond the mark). Messages below the mark are skipped. Every entry written by a chunk
that did not reach its mark (its end offset is beyond the mark) is read as its value before
that chunk: the state rolls back to exactly the mark. The engine is deterministic, so
replaying the same messages in the same order rebuilds the same state and sends the same
outputs again, which storage takes idempotently (natural keys, highest revision). Nothing is
counted twice or lost, whatever the chunk sizes before and after the crash.

Per chunk, each changed key is written once, however many messages changed it: the reason
chunks are fast.
"""

from __future__ import annotations

import gc
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import orjson

from pilotlab.contracts import DeviceStatus, KpiValue, ReadingBatch
from pilotlab.manifest import Experiment
from streams.engine import DEDUP_MEMORY, kpi_values, step, window_loader

E = TypeVar("E")


def mark_key(partition: int) -> str:
    return f"a|{partition}"


def read_mark(stored: Callable[[str], bytes | None], partition: int) -> int:
    """A partition's mark (the next offset to apply; 0 before its first chunk)."""
    raw = stored(mark_key(partition))
    return 0 if raw is None else int(raw)


def encode_entry(end: int, value: bytes, before: bytes) -> bytes:
    """``<end offset>|<len(value)>|<value><before>``: values are JSON (``null`` = absent)."""
    return b"%d|%d|%s%s" % (end, len(value), value, before)


def decode_entry(raw: bytes) -> tuple[int, bytes, bytes]:
    i = raw.index(b"|")
    j = raw.index(b"|", i + 1)
    n = int(raw[i + 1 : j])
    return int(raw[:i]), raw[j + 1 : j + 1 + n], raw[j + 1 + n :]


class Chunk:
    """The state seen by the messages of one chunk from one partition.

    ``stored`` reads the worker's table (key → entry bytes, or the mark as decimal bytes).
    ``get`` hands out the chunk's own mutable copy of a value (the engine updates it in
    place and hands it back through ``put``); ``writes`` gives the entries to store, the mark
    last."""

    def __init__(self, stored: Callable[[str], bytes | None], partition: int) -> None:
        self._stored = stored
        self.partition = partition
        self.mark = read_mark(stored, partition)
        self.end: int | None = None  # the offset after the last message taken
        self._work: dict[str, object] = {}
        self._before: dict[str, bytes] = {}
        self._dirty: set[str] = set()

    def applied(self, offset: int) -> bool:
        """Whether a message was applied already, by a chunk that reached its mark or by this
        one (a redelivery: skip it)."""
        return offset < self.mark or (self.end is not None and offset < self.end)

    def take(self, offset: int) -> None:
        if self.applied(offset):
            raise ValueError(f"offset {offset} of partition {self.partition} was applied already")
        self.end = offset + 1

    def get(self, key: str):
        if key in self._work:
            return self._work[key]
        raw = self._stored(key)
        if raw is None:
            current = b"null"
        else:
            end, value, before = decode_entry(raw)
            current = before if end > self.mark else value  # roll back a chunk cut short
        self._before[key] = current
        value = self._work[key] = orjson.loads(current)
        return value

    def put(self, key: str, value: object) -> None:
        if key not in self._before:
            self.get(key)
        self._work[key] = value
        self._dirty.add(key)

    def writes(self) -> list[tuple[str, bytes]]:
        if self.end is None:
            return []
        out = [(k, encode_entry(self.end, orjson.dumps(self._work[k]), self._before[k])) for k in sorted(self._dirty)]
        out.append((mark_key(self.partition), str(self.end).encode()))
        return out


@dataclass
class ChunkOut:
    """What a chunk sends (outputs first, then ``writes`` in order)."""

    kpis: dict[str, list[KpiValue]] = field(default_factory=dict)  # experiment → latest values
    late: list[ReadingBatch] = field(default_factory=list)
    transitions: list[DeviceStatus] = field(default_factory=list)
    writes: list[tuple[str, bytes]] = field(default_factory=list)
    skipped: int = 0  # messages applied before (a redelivery below the mark)


@dataclass(frozen=True, slots=True)
class Admitted(Generic[E]):
    """What ``admit`` lets through of one partition's messages."""

    messages: list[E]  # to apply, in order, contiguous from the offset expected
    skipped: int  # applied already (redeliveries below the next offset expected)
    gap: tuple[int, int] | None = None  # (next offset expected, lowest offset past it delivered)
    rest: Sequence[E] = ()  # the messages past the gap, in delivery order: not admitted


def admit(expected: int, messages: Sequence[E], offset_of: Callable[[E], int]) -> Admitted[E]:
    """The messages of one partition (in delivery order) that the state can apply now.

    ``expected`` is the partition's mark: the next offset to apply. Offsets below it were
    applied (skipped); the message at it is taken and the next is expected after it. A
    message past the offset expected is held back, never applied past the offsets in between:
    the mark (and the commit) would then cover them and they would be lost for good. Held-back
    messages the walk reaches later are dropped as redeliveries; the others are ``rest``, and
    ``gap`` names the offset still missing. Kafka offsets of ``pilotlab.readings`` are
    contiguous (no transactions, no compaction), so a gap means records held back: delivered
    out of order after a seek, or a consumer position ahead of the state (the worker seeks
    back, ``Rewinds``). Only retention makes a gap legitimate; the worker checks the log start
    before it takes past one."""
    taken: list[E] = []
    held: list[E] = []
    skipped = 0
    for m in messages:
        offset = offset_of(m)
        if offset < expected:
            skipped += 1
        elif offset == expected:
            taken.append(m)
            expected += 1
        else:
            held.append(m)
    rest = [m for m in held if offset_of(m) >= expected]
    skipped += len(held) - len(rest)
    if not rest:
        return Admitted(taken, skipped)
    return Admitted(taken, skipped, (expected, min(offset_of(m) for m in rest)), rest)


class Rewinds:
    """Partitions sought back to the offset their state expects, until it arrives.

    After a seek the records fetched before it still come through (from Faust's queues): they
    lie past the gap too, and are held back without another seek for each of them. A partition
    whose expected offset has not come ``retry_s`` after its seek is due for another one (a
    rebalance may have undone it)."""

    def __init__(self, retry_s: float = 10.0) -> None:
        self.retry_s = retry_s
        self._sought: dict[int, tuple[int, int, float]] = {}  # partition → (expected, target, when)

    def target(self, partition: int, expected: int, now: float) -> int | None:
        """Where ``partition`` was sought to for the offset ``expected``; None when a seek is
        due (never sought for it, or ``retry_s`` ago)."""
        last = self._sought.get(partition)
        if last is None or last[0] != expected or now - last[2] >= self.retry_s:
            return None
        return last[1]

    def sought(self, partition: int, expected: int, target: int, now: float) -> None:
        """``partition`` was sought to ``target`` (above ``expected`` only when the log starts
        there: the records in between are deleted)."""
        self._sought[partition] = (expected, target, now)

    def reached(self, partition: int) -> None:
        """The partition's messages follow on from its state again."""
        self._sought.pop(partition, None)

    def forget(self) -> None:
        """A new assignment: Faust seeks every partition to its committed offset itself."""
        self._sought.clear()


@contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while a chunk is decoded or computed.

    A chunk's decoded messages and working states live until the chunk ends, then die by
    reference counting (they make no cycles). With the collector on, a chunk's many
    allocations set off young-generation collections that walk these objects again and
    again and promote them to the old generation, whose full collections walk them once
    more: about 0.5 µs of CPU per datapoint, a fifth of the worker's pure path
    (``bench/bench_streams_engine.py``). Only synchronous code runs inside (no ``await``), and
    the collector is back on when it ends, so cycles made meanwhile are still collected."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def run_chunk(
    chunk: Chunk,
    messages: Iterable[tuple[int, ReadingBatch, Experiment]],
    *,
    horizon_ms: int,
    memory: int = DEDUP_MEMORY,
) -> ChunkOut:
    """Run one partition's messages (offset, batch, its experiment) through the engine; the
    batches of a packed record (``pilotlab.contracts.pack_batches``) follow each other with
    its offset."""
    out = ChunkOut()
    touched: dict[str, tuple[Experiment, dict[str, set[str]]]] = {}
    taken = None
    for offset, batch, experiment in messages:
        if offset != taken:  # the batches of one packed record share its offset
            if chunk.applied(offset):
                out.skipped += 1
                continue
            chunk.take(offset)
            taken = offset
        done = step(batch, experiment, chunk.get, chunk.put, horizon_ms=horizon_ms, memory=memory)
        if done.late:
            held = ReadingBatch(batch.experiment_id, batch.device_id, batch.group, batch.received_ms, done.late)
            out.late.append(held)
        out.transitions.extend(done.transitions)
        windows = touched.setdefault(experiment.id, (experiment, defaultdict(set)))[1]
        touched[experiment.id] = (experiment, windows)  # the newest manifest computes the values
        for k, names in done.touched.items():
            windows[k] |= names
    for exp_id, (experiment, windows) in touched.items():
        values = kpi_values(experiment, windows, window_loader(chunk.get))
        if values:
            out.kpis[exp_id] = values
    out.writes = chunk.writes()
    return out
