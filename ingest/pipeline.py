"""What ingest does with one MQTT message, as a pure function: topic, payload, clock and
registry in; the batch to forward and the rejections to report out. No I/O here."""

from __future__ import annotations

from dataclasses import dataclass, field

from ingest.decode import ItemError, Limits, TopicAddress, decode, parse_topic
from pilotlab.contracts import ReadingBatch, Rejection, excerpt
from pilotlab.registry import Refusal, Registry


@dataclass(slots=True)
class Outcome:
    batch: ReadingBatch | None = None
    rejections: list[Rejection] = field(default_factory=list)
    address: TopicAddress | None = None


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
