"""Kafka topic set-up and consumer-group lag, shared by the CLI, the demo and the tests."""

from __future__ import annotations

import time

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from pilotlab.contracts import KafkaTopics


def ensure_topics(bootstrap: str, partitions: int, topics: tuple[str, ...] = KafkaTopics.ALL) -> list[str]:
    """Create the pipeline's topics if missing; returns the ones created.

    Retention is set explicitly (tansu reports an empty topic config otherwise); the registry
    is compacted with a single partition so that every follower sees one ordered history.
    """
    admin = AdminClient({"bootstrap.servers": bootstrap})
    existing = set(admin.list_topics(timeout=15).topics)
    wanted = []
    for name in topics:
        if name in existing:
            continue
        if name in KafkaTopics.COMPACTED:
            wanted.append(NewTopic(name, 1, 1, config={"cleanup.policy": "compact", "retention.ms": "-1"}))
        else:
            wanted.append(NewTopic(name, partitions, 1, config={"retention.ms": str(7 * 86400 * 1000)}))
    created: list[str] = []
    if not wanted:
        return created
    for name, fut in admin.create_topics(wanted, request_timeout=15).items():
        try:
            fut.result()
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    return created


def end_offsets(bootstrap: str, partitions: list[tuple[str, int]], timeout: float = 10.0) -> dict[tuple[str, int], int]:
    """Each partition's end offset: the offset its next record will get.

    A ListOffsets answer (``get_watermark_offsets``) is not enough on tansu 0.6: it reports the
    last record batch's base offset + 1, so 30 records written as one batch at offsets 50..79
    report an end of 51. A fetch response carries the true high watermark, so this reads from
    the reported end - 1 until end-of-partition, whose offset is the true end. On Apache Kafka
    that read returns at once with the same value ListOffsets gave.
    """
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "pilotlab-end-offsets",  # required by librdkafka; never committed
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "fetch.wait.max.ms": 50,
        }
    )
    try:
        ends: dict[tuple[str, int], int] = {}
        tail: list[TopicPartition] = []
        for topic, partition in partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=timeout)
            ends[(topic, partition)] = high
            if high > low:
                tail.append(TopicPartition(topic, partition, high - 1))
        if not tail:
            return ends
        consumer.assign(tail)
        waiting = {(tp.topic, tp.partition) for tp in tail}
        deadline = time.monotonic() + timeout
        while waiting:
            if time.monotonic() > deadline:
                raise KafkaException(KafkaError(KafkaError._TIMED_OUT, f"no end of partition for {sorted(waiting)}"))
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            key = (msg.topic(), msg.partition())
            err = msg.error()
            if err is None:
                ends[key] = max(ends[key], msg.offset() + 1)
            elif err.code() == KafkaError._PARTITION_EOF:
                ends[key] = max(ends[key], msg.offset())
                waiting.discard(key)
            else:
                raise KafkaException(err)
        return ends
    finally:
        consumer.close()


class LagUnavailable(RuntimeError):
    """The broker could not tell a consumer group's lag in time (overloaded or restarting):
    the lag is unknown, not zero; ask again later."""


def group_lag(bootstrap: str, group: str, topics: tuple[str, ...], timeout: float = 10.0) -> int:
    """Records on ``topics`` not yet committed by consumer group ``group`` (all partitions),
    against the true end offsets (see ``end_offsets``). Raises :class:`LagUnavailable`, naming
    the cause, when the broker does not answer in time; never another exception type."""
    try:
        consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
        try:
            meta = consumer.list_topics(timeout=timeout)
            tps = [TopicPartition(t, p) for t in topics if t in meta.topics for p in meta.topics[t].partitions]
            committed = consumer.committed(tps, timeout=timeout)
        finally:
            consumer.close()
        failed = [tp for tp in committed if tp.error is not None]
        if failed:
            raise KafkaException(failed[0].error)
        ends = end_offsets(bootstrap, [(tp.topic, tp.partition) for tp in tps], timeout=timeout)
    except KafkaException as exc:
        raise LagUnavailable(f"lag of group {group} on {', '.join(topics)} unknown: {exc.args[0]}") from exc
    lag = 0
    for tp in committed:
        done = tp.offset if tp.offset >= 0 else 0
        lag += max(0, ends[(tp.topic, tp.partition)] - done)
    return lag


def lag_or_reason(bootstrap: str, group: str, topics: tuple[str, ...]) -> int | str:
    """For polling loops: the lag, or why it is unknown right now (a string to show)."""
    try:
        return group_lag(bootstrap, group, topics)
    except LagUnavailable as exc:
        return str(exc)
