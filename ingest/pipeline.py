"""What ingest does with one MQTT message, as a pure function: topic, payload, clock and
registry in; the batch to forward and the rejections to report out. No I/O here."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ingest.decode import ItemError, TopicAddress, decode, parse_topic
from ingest.dedup import SeqMemory, ValueMemory
from pilotlab.contracts import Limits, Reading, ReadingBatch, Reason, Rejection, excerpt, from_ms
from pilotlab.registry import Refusal, Registry


@dataclass(slots=True)
class Outcome:
    batch: ReadingBatch | None = None
    rejections: list[Rejection] = field(default_factory=list)
    address: TopicAddress | None = None
    senml: bool = False
    indexes: list[int | None] = field(default_factory=list)  # batch item of each reading (native)


def _reject(
    err: ItemError, topic: str, payload: bytes, now_ms: int, address: TopicAddress | None
) -> Rejection:
    return Rejection(
        reason=err.reason,
        detail=err.detail,
        topic=topic,
        received_ms=now_ms,
        experiment_id=address.experiment_id if address else None,
        device_id=address.device_id if address else None,
        item_index=err.item_index,
        excerpt=excerpt(payload),
        rejection_id=Rejection.make_id(topic, payload, err.item_index, str(err.reason)),
    )


def handle(topic: str, payload: bytes, now_ms: int, registry: Registry, limits: Limits) -> Outcome:
    address = parse_topic(topic)
    if isinstance(address, ItemError):
        return Outcome(rejections=[_reject(address, topic, payload, now_ms, None)])
    out = Outcome(address=address)
    device = registry.authorise(address.experiment_id, address.device_id)
    if isinstance(device, Refusal):  # refused before the payload is even read
        out.rejections.append(
            _reject(ItemError(device.reason, device.detail), topic, payload, now_ms, address)
        )
        return out
    decoded = decode(payload, now_ms, limits)
    out.senml, out.indexes = decoded.senml, decoded.indexes
    out.rejections.extend(_reject(e, topic, payload, now_ms, address) for e in decoded.errors)
    if decoded.readings:
        out.batch = ReadingBatch(
            experiment_id=address.experiment_id,
            device_id=address.device_id,
            group=device.group,
            received_ms=now_ms,
            readings=tuple(decoded.readings),
        )
    return out


def screen_duplicates(out: Outcome, memory: SeqMemory, topic: str, payload: bytes) -> list[object]:
    """Refuse, as ``duplicate``, each native reading whose (device, seq) ``memory`` has seen or
    that repeats a seq earlier in the same message; the rest stays in ``out.batch``. Returns
    the tokens of the first sightings (the service waits for them before acknowledging).
    SenML readings carry no seq and pass untouched. Does not remember anything: call
    ``remember`` once the batch is handed to Kafka."""
    if out.batch is None or out.senml:
        return []
    device = out.batch.device_id
    keep, kept_indexes, tokens, here = [], [], [], set()
    remembered = memory.of(device)
    for reading, index in zip(out.batch.readings, out.indexes, strict=True):
        seen = reading.seq in remembered
        if seen or reading.seq in here:
            where = "in this message" if reading.seq in here else "already"
            err = ItemError(Reason.DUPLICATE, f"seq {reading.seq} of {device} was {where} accepted", index)
            out.rejections.append(_reject(err, topic, payload, out.batch.received_ms, out.address))
            if seen:
                tokens.append(remembered[reading.seq])
            continue
        keep.append(reading)
        kept_indexes.append(index)
        here.add(reading.seq)
    if len(keep) < len(out.batch.readings):
        out.indexes = kept_indexes
        out.batch = replace(out.batch, readings=tuple(keep)) if keep else None
    return tokens


@dataclass(slots=True)
class Conflicts:
    """What ``screen_conflicts`` found: tokens of the hand-offs to wait for, and how many
    metric values repeated an accepted one exactly (dropped)."""

    tokens: list[object] = field(default_factory=list)
    repeats: int = 0


def screen_conflicts(out: Outcome, memory: ValueMemory, topic: str, payload: bytes) -> Conflicts:
    """Each reading's metrics against the values already accepted for the same (device,
    metric, ts), in ``memory`` or earlier in this message: another value is refused as
    ``conflicting_reading`` (one refusal per item, naming each metric), the same value is an
    exact repeat and dropped. Native and SenML alike. Call after ``screen_duplicates``;
    remembers nothing (``remember`` does, once the batch is handed to Kafka)."""
    found = Conflicts()
    if out.batch is None:
        return found
    device = out.batch.device_id
    # (ts → {metric: value}) accepted earlier in this message; a dict per instant (not a
    # (ts, metric) tuple per value) so a reading at an instant nobody has seen costs two
    # lookups, which is nearly every reading
    here: dict[int, dict[str, float]] = {}
    keep: list[Reading] = []
    kept_indexes: list[int | None] = []
    indexes = out.indexes if len(out.indexes) == len(out.batch.readings) else [None] * len(out.batch.readings)
    changed = False
    for reading, index in zip(out.batch.readings, indexes, strict=True):
        earlier = memory.lookup(device, reading.ts_ms)
        seen = here.get(reading.ts_ms)
        if earlier is None and seen is None:  # a new instant: every value is fresh
            here[reading.ts_ms] = reading.metrics
            keep.append(reading)
            kept_indexes.append(index)
            continue
        fresh: dict[str, float] = {}
        clashes = []
        for metric, value in reading.metrics.items():
            prev = seen.get(metric) if seen is not None else None
            if prev is None and earlier is not None:
                prev = earlier[0].get(metric)
                if prev is not None and earlier[1] is not None:
                    found.tokens.append(earlier[1])
            if prev is None:
                fresh[metric] = value
            elif prev == value:
                found.repeats += 1
            else:
                clashes.append(f"{metric} {value!r} (accepted before: {prev!r})")
        if fresh:
            here[reading.ts_ms] = {**seen, **fresh} if seen is not None else fresh  # never mutate a reading's dict
        if clashes:
            when = from_ms(reading.ts_ms).isoformat().replace("+00:00", "Z")
            detail = f"{device} at {when}: {', '.join(clashes)}; one value per metric and instant is kept"
            err = ItemError(Reason.CONFLICTING_READING, detail, index)
            out.rejections.append(_reject(err, topic, payload, out.batch.received_ms, out.address))
        if len(fresh) < len(reading.metrics):
            changed = True
            if not fresh:
                continue
            keep.append(Reading(reading.seq, reading.ts_ms, fresh))
        else:
            keep.append(reading)
        kept_indexes.append(index)
    if changed:
        out.indexes = kept_indexes if out.indexes else []
        out.batch = replace(out.batch, readings=tuple(keep)) if keep else None
    return found


def remember(out: Outcome, memory: SeqMemory, token: object = None, values: ValueMemory | None = None) -> None:
    """Record the forwarded readings — native seqs in ``memory``, every reading's values in
    ``values`` — with the token of their hand-off."""
    if out.batch is None:
        return
    if not out.senml:
        memory.remember_all(out.batch.device_id, [r.seq for r in out.batch.readings], token)
    if values is not None:
        values.remember_all(out.batch.device_id, out.batch.readings, token)
