"""Kafka topic set-up and consumer-group lag, shared by the CLI, the demo and the tests."""

from __future__ import annotations

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


def group_lag(bootstrap: str, group: str, topics: tuple[str, ...]) -> int:
    """Messages on ``topics`` not yet committed by consumer group ``group`` (all partitions)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        meta = consumer.list_topics(timeout=10)
        tps = [TopicPartition(t, p) for t in topics if t in meta.topics for p in meta.topics[t].partitions]
        committed = consumer.committed(tps, timeout=10)
        lag = 0
        for tp in committed:
            _low, high = consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=10)
            done = tp.offset if tp.offset >= 0 else 0
            lag += max(0, high - done)
        return lag
    finally:
        consumer.close()
