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
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import orjson

from pilotlab.contracts import DeviceStatus, KpiValue, ReadingBatch
from pilotlab.manifest import Experiment
from streams.engine import DEDUP_MEMORY, kpi_values, step, window_loader


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

    @property
    def has_mark(self) -> bool:
        """Whether the partition has a mark yet (before its first chunk, the first offset read
        is where it starts: a topic's log may begin after 0)."""
        return self.end is not None or self.mark > 0  # a written mark is an offset + 1

    @property
    def next_offset(self) -> int:
        """The offset the state expects next: after this chunk's last message, else the mark."""
        return self.end if self.end is not None else self.mark

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
    # (next offset the state expected, offset taken instead): offsets that never reached the
    # chunk, though the mark now covers them. Kafka offsets of pilotlab.readings are contiguous
    # (no transactions, no compaction), so a gap means messages were held back from the agent:
    # the worker logs it loudly (it is what a KPI window one reading short would come from)
    gaps: list[tuple[int, int]] = field(default_factory=list)


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
    """Run one partition's messages (offset, batch, its experiment) through the engine."""
    out = ChunkOut()
    touched: dict[str, tuple[Experiment, dict[str, set[str]]]] = {}
    for offset, batch, experiment in messages:
        if chunk.applied(offset):
            out.skipped += 1
            continue
        expected = chunk.next_offset
        if chunk.has_mark and offset != expected:
            out.gaps.append((expected, offset))
        chunk.take(offset)
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
