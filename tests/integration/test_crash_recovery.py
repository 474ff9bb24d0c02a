"""kill -9 of each service mid-stream, then restart: nothing accepted is lost, nothing is
stored or counted twice. Readings and KPIs are compared exactly with what was published."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from psycopg import sql

from control.services import Services
from control.stack import Stack
from pilotlab import registry
from pilotlab.contracts import to_ms
from pilotlab.kafka_admin import end_offsets, ensure_topics
from simulators.publisher import publish
from storage.migrate import migrate
from tests.integration.test_end_to_end import expected_kpis, make_experiment, stored_kpis

pytestmark = pytest.mark.integration


def kpis_on_topic(bootstrap: str, exp_id: str) -> dict[tuple, tuple]:
    """Diagnostics: the highest (revision, count) per KPI window on the KPI topic."""
    from confluent_kafka import Consumer, TopicPartition  # noqa: PLC0415

    from pilotlab.contracts import KafkaTopics, decode_kpis  # noqa: PLC0415

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "diag", "enable.auto.commit": False})
    meta = consumer.list_topics(KafkaTopics.KPIS, timeout=10)
    parts = list(meta.topics[KafkaTopics.KPIS].partitions)
    consumer.assign([TopicPartition(KafkaTopics.KPIS, p, 0) for p in parts])
    ends = {p: end for (_t, p), end in end_offsets(bootstrap, [(KafkaTopics.KPIS, p) for p in parts]).items()}
    best: dict[tuple, tuple] = {}
    done = {p for p, e in ends.items() if e == 0}
    while len(done) < len(parts):
        msg = consumer.poll(2)
        if msg is None:
            break
        if msg.error():
            continue
        if msg.offset() + 1 >= ends[msg.partition()]:
            done.add(msg.partition())
        for v in decode_kpis(msg.value()):
            if v.experiment_id == exp_id:
                key = (v.kpi, v.device_group, v.window_start_ms)
                best[key] = max(best.get(key, (0, 0)), (v.revision, v.sample_count))
    consumer.close()
    return best


def busy(database_url: str, victim: str, exp_id: str, timeout: float = 30.0) -> None:
    """Until the victim has done part of its work (its output is in the database): a worker
    killed before it joined its consumer group would test nothing."""
    table = "kpi_values" if victim == "streams" else "readings"
    query = sql.SQL("SELECT count(*) FROM {} WHERE experiment_id = %s").format(sql.Identifier(table))
    deadline = time.monotonic() + timeout
    with psycopg.connect(database_url, autocommit=True) as conn:
        while conn.execute(query, (exp_id,)).fetchone()[0] == 0:
            if time.monotonic() > deadline:
                pytest.fail(f"no rows in {table} for {exp_id} after {timeout} s")
            time.sleep(0.2)


@pytest.fixture
def own_stack(tmp_path):
    """A fresh stack per victim: each crash starts from a clean broker and consumer groups."""
    s = Stack(tmp_path / "stack")
    try:
        state = s.up()
        migrate(state.database_url)
        ensure_topics(state.kafka_bootstrap, partitions=4)
        yield s, state
    finally:
        s.down(purge=True)


@pytest.mark.parametrize("victim", ["ingest", "streams", "sink"])
def test_kill_minus_nine_mid_stream_loses_and_duplicates_nothing(own_stack, victim):
    stack, stack_state = own_stack
    exp = make_experiment(f"crash-{victim}", f"k{victim[:2]}", minutes=300)
    registry.publish(stack_state.kafka_bootstrap, [exp])
    result = {}

    with Services(stack_state, stack.logs / f"services-crash-{victim}").start() as services:
        services.wait_ingest_ready()
        halfway, resume = threading.Event(), threading.Event()

        def hold_halfway(done: int, total: int) -> None:
            """The kill always lands mid-stream, however slow the machine: past half the
            messages the publisher waits until the victim has been killed."""
            if done >= total // 2 and not halfway.is_set():
                halfway.set()
                resume.wait(300)

        publisher = threading.Thread(
            target=lambda: result.setdefault(
                "truth",
                publish(stack_state.mqtt_url, [exp], seed=5, duration_s=10, batch=1, progress=hold_halfway),
            )
        )
        publisher.start()
        try:
            assert halfway.wait(120), "the publisher did not get halfway"
            busy(stack_state.database_url, victim, exp.id)
        except BaseException:
            resume.set()
            raise
        services.kill(victim)
        resume.set()
        time.sleep(1.0)
        services.start(victim)
        publisher.join(timeout=120)
        truth = result["truth"]
        if victim == "ingest":
            services.wait_ingest_ready()
        services.wait_drained(
            len(truth.accepted), sum(truth.rejected.values()), experiment_ids=[exp.id], timeout=120
        )

        with psycopg.connect(stack_state.database_url) as conn:
            rows = conn.execute(
                "SELECT device_id, metric, ts, value FROM readings WHERE experiment_id = %s", (exp.id,)
            ).fetchall()
            assert {(d, m, to_ms(ts)): v for d, m, ts, v in rows} == truth.accepted
            assert len(rows) == len(truth.accepted)
            rejections = conn.execute(
                "SELECT count(*) FROM rejections WHERE experiment_id = %s", (exp.id,)
            ).fetchone()[0]
            assert rejections == sum(truth.rejected.values())

            want = expected_kpis(exp, truth.accepted)
            deadline = time.monotonic() + 60
            while True:
                got = stored_kpis(conn, exp.id)
                bad = [
                    k
                    for k in want
                    if k not in got
                    or got[k][1] != want[k][1]
                    or got[k][0] != pytest.approx(want[k][0], rel=1e-9, abs=1e-9)
                ]
                if not bad and got.keys() == want.keys():
                    break
                if time.monotonic() > deadline:
                    on_topic = kpis_on_topic(stack_state.kafka_bootstrap, exp.id)
                    sample = [(k, want[k], got.get(k), "topic max:", on_topic.get(k)) for k in bad[:3]]
                    pytest.fail(
                        f"{len(bad)} of {len(want)} KPI windows differ after killing {victim}: {sample}"
                    )
                time.sleep(0.5)
                conn.commit()
