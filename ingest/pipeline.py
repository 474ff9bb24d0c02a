"""What ingest does with one MQTT message, as a pure function: topic, payload, clock and
registry in; the batch to forward and the rejections to report out. No I/O here."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ingest.decode import ItemError, Limits, TopicAddress, decode, parse_topic
from ingest.dedup import SeqMemory
from pilotlab.contracts import ReadingBatch, Reason, Rejection, excerpt
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
    for reading, index in zip(out.batch.readings, out.indexes, strict=True):
        seen, token = memory.lookup(device, reading.seq)
        if seen or reading.seq in here:
            where = "in this message" if reading.seq in here else "already"
            err = ItemError(Reason.DUPLICATE, f"seq {reading.seq} of {device} was {where} accepted", index)
            out.rejections.append(_reject(err, topic, payload, out.batch.received_ms, out.address))
            if seen:
                tokens.append(token)
            continue
        keep.append(reading)
        kept_indexes.append(index)
        here.add(reading.seq)
    if len(keep) < len(out.batch.readings):
        out.indexes = kept_indexes
        out.batch = replace(out.batch, readings=tuple(keep)) if keep else None
    return tokens


def remember(out: Outcome, memory: SeqMemory, token: object = None) -> None:
    """Record the forwarded native readings' seqs, with the token of their hand-off."""
    if out.batch is None or out.senml:
        return
    for reading in out.batch.readings:
        memory.remember(out.batch.device_id, reading.seq, token)
