"""Ingest's ``duplicate`` check: a device's ``seq`` seen again, kept in bounded memory.

This is feedback for the startup (its device re-sent a reading) and a saving (the copy is
not forwarded), not the guard against double counting: the streams worker screens repeated
readings on (device, metric, ts) and storage upserts on the same key. So the memory may
forget, and it does, by design:

- per device it keeps the last ``per_device`` sequence numbers it accepted (oldest forgotten
  first) and at most ``max_devices`` devices (least recently active forgotten first): memory
  is bounded by ``per_device * max_devices`` entries whatever the traffic;
- it lives in the process: after a restart, and across replicas (a shared subscription hands
  each message to one replica, so a device's re-send may reach another one), a repeated seq
  is forwarded and screened downstream instead;
- each remembered seq keeps a token (the service uses the pending Kafka hand-off of the
  message that carried it), so that a duplicate is only acknowledged once the original is
  confirmed by Kafka: a refusal as ``duplicate`` never stands in for a reading that was lost.

Pure data structure, no I/O; not thread-safe (the service calls it from one thread).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from types import MappingProxyType

from pilotlab.contracts import Reading

_NOTHING: Mapping[int, object] = MappingProxyType({})


class SeqMemory:
    def __init__(self, per_device: int = 1024, max_devices: int = 100_000) -> None:
        if per_device < 1 or max_devices < 1:
            raise ValueError("per_device and max_devices must be at least 1")
        self.per_device = per_device
        self.max_devices = max_devices
        # device → (seq → token), both in insertion order: the oldest is forgotten first
        self._devices: OrderedDict[str, OrderedDict[int, object]] = OrderedDict()

    def __len__(self) -> int:
        return sum(len(seqs) for seqs in self._devices.values())

    def devices(self) -> int:
        return len(self._devices)

    def of(self, device: str) -> Mapping[int, object]:
        """The device's remembered seqs → tokens, to read (one lookup per message, not per seq)."""
        return self._devices.get(device, _NOTHING)

    def lookup(self, device: str, seq: int) -> tuple[bool, object]:
        """(seen, token of the first sighting)."""
        seqs = self._devices.get(device)
        if seqs is None or seq not in seqs:
            return False, None
        return True, seqs[seq]

    def remember(self, device: str, seq: int, token: object = None) -> None:
        self.remember_all(device, (seq,), token)

    def remember_all(self, device: str, seqs_seen: Iterable[int], token: object = None) -> None:
        """``remember`` for each seq in turn (the device is looked up once per message)."""
        seqs = self._devices.get(device)
        if seqs is None:
            seqs = self._devices[device] = OrderedDict()
            while len(self._devices) > self.max_devices:
                self._devices.popitem(last=False)
        else:
            self._devices.move_to_end(device)
        for seq in seqs_seen:
            if seq in seqs:
                continue
            seqs[seq] = token
            if len(seqs) > self.per_device:
                seqs.popitem(last=False)


class ValueMemory:
    """The values a device's recent readings were accepted with: ``(device, ts) → {metric:
    value}``, with the token of the hand-off that carried them. A reading that repeats an
    accepted (device, metric, ts) with another value is a ``conflicting_reading`` (storage
    keeps one value per key: the second would vanish without a word); with the same value it
    is an exact repeat, dropped idempotently.

    Bounded like :class:`SeqMemory`: the last ``per_device`` instants of each device and at
    most ``max_devices`` devices, in this process only. Beyond it (an older instant, another
    replica, a restart), storage keeps the first value it stored for the key and the streams
    worker counts the later copy as a duplicate (see docs). Pure, not thread-safe."""

    def __init__(self, per_device: int = 256, max_devices: int = 100_000) -> None:
        if per_device < 1 or max_devices < 1:
            raise ValueError("per_device and max_devices must be at least 1")
        self.per_device = per_device
        self.max_devices = max_devices
        # device → (ts → {metric: value} in insertion order, ts → token). Two maps rather than a
        # (values, token) tuple per instant: a {str: float} dict is not tracked by Python's
        # cycle collector, a tuple holding a token is, and 50,000 remembered instants of
        # tracked tuples made every full collection walk them (about 10% of ingest's CPU at
        # 40,000 datapoints/s). Nothing per instant here is a tracked object.
        self._devices: OrderedDict[str, tuple[OrderedDict[int, dict[str, float]], dict[int, object]]] = OrderedDict()

    def lookup(self, device: str, ts_ms: int) -> tuple[dict[str, float], object] | None:
        mem = self._devices.get(device)
        if mem is None:
            return None
        values = mem[0].get(ts_ms)
        return None if values is None else (values, mem[1][ts_ms])

    def remember(self, device: str, ts_ms: int, metrics: dict[str, float], token: object = None) -> None:
        self.remember_all(device, (Reading(0, ts_ms, metrics),), token)

    def remember_all(self, device: str, readings: Iterable[Reading], token: object = None) -> None:
        """``remember`` each reading's values in turn (the device is looked up once per message)."""
        mem = self._devices.get(device)
        if mem is None:
            mem = self._devices[device] = (OrderedDict(), {})
            while len(self._devices) > self.max_devices:
                self._devices.popitem(last=False)
        else:
            self._devices.move_to_end(device)
        values, tokens = mem
        for reading in readings:
            have = values.get(reading.ts_ms)
            if have is None:
                # the reading's own dict, not a copy (a Reading's metrics are never changed,
                # and this memory never changes a dict it keeps: a merge makes a new one)
                values[reading.ts_ms] = reading.metrics
                tokens[reading.ts_ms] = token
                if len(values) > self.per_device:
                    del tokens[values.popitem(last=False)[0]]
            else:
                values[reading.ts_ms] = {**have, **reading.metrics}
