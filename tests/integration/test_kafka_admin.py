"""End offsets and consumer-group lag on the real broker. tansu answers ListOffsets with the
last record batch's base offset + 1, so a lag computed from it reads 0 while the tail of the
last batch is still unread (the demo once reported an impact before its last KPI revisions
were stored)."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from control.stack import StackState, free_port
from pilotlab.kafka_admin import LagUnavailable, end_offsets, group_lag, lag_or_reason

pytestmark = pytest.mark.integration

TOPIC = "admin-test"


@pytest.fixture(scope="module")
def written(stack_state: StackState) -> str:
    """Partition 0: a batch of 50 records then a batch of 30; partition 1: one record;
    partition 2: nothing."""
    bootstrap = stack_state.kafka_bootstrap
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for fut in admin.create_topics([NewTopic(TOPIC, 3, 1, config={"retention.ms": "3600000"})]).values():
        fut.result()
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 200})
    for n in (50, 30):
        for i in range(n):
            producer.produce(TOPIC, value=b"%d" % i, partition=0)
        assert producer.flush(10) == 0
    producer.produce(TOPIC, value=b"one", partition=1)
    assert producer.flush(10) == 0
    return bootstrap


def test_end_offsets_count_every_record_of_the_last_batch(written: str):
    parts = [(TOPIC, 0), (TOPIC, 1), (TOPIC, 2)]
    assert end_offsets(written, parts) == {(TOPIC, 0): 80, (TOPIC, 1): 1, (TOPIC, 2): 0}


def test_group_lag_counts_the_unread_tail_of_the_last_batch(written: str):
    group = "admin-test-group"
    consumer = Consumer({"bootstrap.servers": written, "group.id": group, "enable.auto.commit": False})
    try:
        # committed at 51: where a lag from ListOffsets alone would call partition 0 drained on tansu
        consumer.commit(offsets=[TopicPartition(TOPIC, 0, 51)], asynchronous=False)
    finally:
        consumer.close()
    assert group_lag(written, group, (TOPIC,)) == (80 - 51) + 1


def test_group_lag_says_clearly_when_the_broker_cannot_answer():
    """No broker at the address (as during a restart): a LagUnavailable naming the group,
    within the timeout, never a librdkafka exception; polling loops get the reason instead."""
    port = free_port()  # nobody listens here
    started = time.monotonic()
    with pytest.raises(LagUnavailable, match="lag of group g on t1 unknown"):
        group_lag(f"127.0.0.1:{port}", "g", ("t1",), timeout=2)
    assert time.monotonic() - started < 15
    assert lag_or_reason(f"127.0.0.1:{port}", "g", ("t1",)).startswith("lag of group g")
