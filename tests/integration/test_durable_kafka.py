"""The embedded Kafka broker's durable storage (tansu's s3:// engine on control.objectstore):
what survives a kill -9 of the broker, restarted with ``Stack.up()`` as ``pilotlab stack up``
does, and the two places where a restarted tansu would lose or strand records without this
repository's care (conditional writes honoured by the object server; the watermark repair)."""

from __future__ import annotations

import json
import urllib.request

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from control import objectstore
from control.stack import OBJECTS_BUCKET, Stack
from pilotlab.kafka_admin import end_offsets, ensure_topics

pytestmark = pytest.mark.integration
TOPIC = "durable-test"


@pytest.fixture
def durable(tmp_path):
    s = Stack(tmp_path / "stack")
    try:
        state = s.up()
        ensure_topics(state.kafka_bootstrap, partitions=2, topics=(TOPIC,))
        yield s, state
    finally:
        s.down(purge=True)


def produce(bootstrap: str, values: list[bytes], partition: int = 0) -> list[int]:
    offsets: list[int] = []
    p = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 20})
    for v in values:
        p.produce(TOPIC, value=v, partition=partition, on_delivery=lambda err, m: offsets.append(m.offset()))
    assert p.flush(30) == 0
    return sorted(offsets)


def read_all(bootstrap: str, partition: int = 0) -> list[tuple[int, bytes]]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "durable-reader", "enable.partition.eof": True})
    c.assign([TopicPartition(TOPIC, partition, 0)])
    out = []
    try:
        while True:
            m = c.poll(10)
            assert m is not None, "no end of partition"
            if m.error():
                return out
            out.append((m.offset(), m.value()))
    finally:
        c.close()


def kill_and_restart(stack: Stack):
    assert stack.stop_service("kafka", kill=True)
    return stack.up()


def test_topics_records_and_committed_offsets_survive_kill_minus_nine(durable):
    stack, state = durable
    first = produce(state.kafka_bootstrap, [b"a%d" % i for i in range(50)])
    group = Consumer({"bootstrap.servers": state.kafka_bootstrap, "group.id": "g-durable", "enable.auto.commit": False})
    group.commit(offsets=[TopicPartition(TOPIC, 0, 20)], asynchronous=False)
    group.close()

    restarted = kill_and_restart(stack)
    assert restarted.kafka_bootstrap == state.kafka_bootstrap  # same address: clients reconnect
    assert TOPIC in AdminClient({"bootstrap.servers": state.kafka_bootstrap}).list_topics(timeout=10).topics
    group = Consumer({"bootstrap.servers": state.kafka_bootstrap, "group.id": "g-durable", "enable.auto.commit": False})
    assert group.committed([TopicPartition(TOPIC, 0)], timeout=10)[0].offset == 20
    group.close()
    # the first produce after the restart, before anything read the partition: appended after
    # the 50 records (an object store ignoring If-None-Match let tansu write it at offset 0)
    second = produce(state.kafka_bootstrap, [b"b%d" % i for i in range(10)])
    assert first == list(range(50)) and second == list(range(50, 60))
    assert [v for _o, v in read_all(state.kafka_bootstrap)] == [b"a%d" % i for i in range(50)] + [
        b"b%d" % i for i in range(10)
    ]


def _watermark_key(partition: int) -> str:
    return f"clusters/tansu_cluster/topics/{TOPIC}/partitions/{partition:010d}/watermark.json"


def test_a_watermark_left_above_the_last_batch_is_set_back_before_the_broker_starts(durable):
    """What a kill between tansu's watermark write and its batch write leaves: the watermark
    5 offsets past the last batch. Without the repair the next batch lands at 35, the offsets
    30..34 never exist and a consumer committing only contiguous offsets stops at 30."""
    stack, state = durable
    produce(state.kafka_bootstrap, [b"x%d" % i for i in range(30)])
    assert stack.stop_service("kafka", kill=True)
    base = stack.load().services["objects"].url
    key = _watermark_key(0)
    with urllib.request.urlopen(f"{base}/{OBJECTS_BUCKET}/{key}") as resp:
        watermark = json.loads(resp.read())
    assert watermark["high"] == 30
    watermark["high"] = 35  # the cut: raised, batch never written
    req = urllib.request.Request(f"{base}/{OBJECTS_BUCKET}/{key}", data=json.dumps(watermark).encode(), method="PUT")
    urllib.request.urlopen(req).close()

    stack.up()  # runs objectstore.repair_watermarks before tansu starts

    assert objectstore.repair_watermarks(base) == []  # nothing left to repair
    assert produce(state.kafka_bootstrap, [b"y0"]) == [30]
    offsets = [o for o, _v in read_all(state.kafka_bootstrap)]
    assert offsets == list(range(31))
    assert end_offsets(state.kafka_bootstrap, [(TOPIC, 0)])[(TOPIC, 0)] == 31


def test_repair_reports_what_it_set_back(durable):
    stack, state = durable
    produce(state.kafka_bootstrap, [b"z%d" % i for i in range(7)], partition=1)
    assert stack.stop_service("kafka", kill=True)
    base = stack.load().services["objects"].url
    key = _watermark_key(1)
    body = json.dumps({"low": None, "high": 9, "timestamps": None}).encode()
    urllib.request.urlopen(urllib.request.Request(f"{base}/{OBJECTS_BUCKET}/{key}", data=body, method="PUT")).close()
    assert objectstore.repair_watermarks(base) == [f"{TOPIC}/0000000001: 9 → 7"]
    stack.up()
    assert produce(state.kafka_bootstrap, [b"w"], partition=1) == [7]


def test_memory_storage_is_a_choice_and_shows_in_status(tmp_path):
    s = Stack(tmp_path / "mem", kafka_storage="memory")
    try:
        state = s.up()
        assert state.kafka_storage == "memory" and "objects" not in state.services
        status = s.status()
        assert status["up"] and status["kafka_storage"] == "memory"
        assert "lost when it stops" in status["kafka_storage_note"]
        with pytest.raises(Exception, match="runs with memory storage"):
            Stack(tmp_path / "mem", kafka_storage="durable").up()
    finally:
        s.down(purge=True)


def test_the_object_server_killed_under_a_running_broker_comes_back_with_stack_up(durable):
    """tansu's S3 client retries while the object server is away (about 3 minutes); `stack up`
    restarts the server on the same port, tansu re-reads what changed (new etags) and every
    acknowledged record is there, in order, without a gap."""
    stack, state = durable
    produce(state.kafka_bootstrap, [b"p%d" % i for i in range(20)])
    kafka_pid = stack.load().services["kafka"].pid
    assert stack.stop_service("objects", kill=True)
    p = Producer({"bootstrap.servers": state.kafka_bootstrap, "acks": "all", "message.timeout.ms": 120_000})
    acked: list[int] = []
    for i in range(20):
        p.produce(TOPIC, value=b"q%d" % i, partition=0, on_delivery=lambda err, m: err or acked.append(m.offset()))
    p.poll(1.0)
    stack.up()
    assert p.flush(120) == 0
    assert stack.load().services["kafka"].pid == kafka_pid  # the broker itself was not restarted
    values = [v for _o, v in read_all(state.kafka_bootstrap)]
    assert sorted(acked) == list(range(20, 40))
    assert values == [b"p%d" % i for i in range(20)] + [b"q%d" % i for i in range(20)]
