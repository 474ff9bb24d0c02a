"""Packing: the readings of several MQTT messages of one experiment in one Kafka record.

Every Kafka record costs the broker, the streams worker (Faust hands each record through its
fetch loop, channel, stream and buffer) and the sink about as much again as the readings in
it: `make bench` measured the streams worker at 8.4 µs of CPU per datapoint with one 30-point
MQTT message per record, 1.9 with 300 points per record. So ingest gathers the batches of
one experiment (the record key) that it takes within a few milliseconds into one record
(``pilotlab.contracts.pack_batches``), up to a number of messages and of bytes, and each
message is still acknowledged to MQTT only once the record holding it is confirmed.

``Packer`` is the bookkeeping alone (no I/O, no threads): the service produces what it
returns, under its own lock, so that a key's packs reach the producer in the order they
were started.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from pilotlab.contracts import pack_batches

T = TypeVar("T")


@dataclass
class Pack(Generic[T]):
    """The encoded batches of one key waiting to be produced as one record, each with the
    ticket (the MQTT message's pending acknowledgement) it must confirm."""

    key: bytes
    started: float
    values: list[bytes] = field(default_factory=list)
    tickets: list[T] = field(default_factory=list)
    size: int = 0

    def value(self) -> bytes:
        return pack_batches(self.values)


class Packer(Generic[T]):
    """Open packs by key; ``add`` returns the packs to produce now (full by messages or
    bytes), ``due`` those open for ``max_wait_s``, ``drain`` all."""

    def __init__(self, max_messages: int, max_bytes: int, max_wait_s: float, clock: Callable[[], float]) -> None:
        if max_messages < 1 or max_bytes < 1 or max_wait_s < 0:
            raise ValueError("a pack holds at least one message and byte, and waits 0 s or more")
        self.max_messages, self.max_bytes, self.max_wait_s = max_messages, max_bytes, max_wait_s
        self.clock = clock
        self._open: dict[bytes, Pack[T]] = {}

    def add(self, key: bytes, value: bytes, ticket: T) -> list[Pack[T]]:
        ready: list[Pack[T]] = []
        pack = self._open.get(key)
        if pack is not None and pack.size + len(value) + 1 > self.max_bytes:
            ready.append(self._open.pop(key))  # this value would not fit: the pack goes as it is
            pack = None
        if pack is None:
            pack = self._open[key] = Pack(key, self.clock())
        pack.values.append(value)
        pack.tickets.append(ticket)
        pack.size += len(value) + 1
        if len(pack.values) >= self.max_messages or pack.size >= self.max_bytes:
            ready.append(self._open.pop(key))
        return ready

    def due(self) -> list[Pack[T]]:
        """The packs open for ``max_wait_s`` or longer, oldest first."""
        now = self.clock()
        keys = [k for k, p in self._open.items() if now - p.started >= self.max_wait_s]
        return sorted((self._open.pop(k) for k in keys), key=lambda p: p.started)

    def wait_s(self, longest: float) -> float:
        """How long until the oldest open pack is due (``longest`` when none is open)."""
        if not self._open:
            return longest
        oldest = min(p.started for p in self._open.values())
        return max(0.0, min(longest, oldest + self.max_wait_s - self.clock()))

    def drain(self) -> list[Pack[T]]:
        packs = sorted(self._open.values(), key=lambda p: p.started)
        self._open.clear()
        return packs

    def __len__(self) -> int:
        """Messages waiting in open packs."""
        return sum(len(p.values) for p in self._open.values())
