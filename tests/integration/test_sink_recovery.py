"""The sink through its two hard cases, on the real session stack (tansu, PostgreSQL 15):

- it dies (exit 137, like kill -9) right after a database commit and before the Kafka offset
  commit (the test hook ``PILOTLAB_SINK_FAULT_AFTER_DB_COMMIT``), then restarts: the replayed
  batches change nothing, and every table holds exactly the published set;
- PostgreSQL is stopped mid-stream and started again: the sink retries, resumes, and loses
  nothing.

Each test uses its own consumer group whose offsets start at the topics' current ends, so the
sink sees exactly what the test publishes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from control.stack import free_port
from pilotlab.contracts import KafkaTopics, encode_kpis, to_ms
from pilotlab.kafka_admin import end_offsets, group_lag
from storage.sink import TOPICS
from tests.timescale.data import Dataset, build

pytestmark = pytest.mark.integration


def start_at_end(bootstrap: str, group: str) -> None:
    """Commit the group's offsets at every partition's current end."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        meta = c.list_topics(timeout=10)
        parts = [(t, p) for t in TOPICS for p in meta.topics[t].partitions]
        ends = end_offsets(bootstrap, parts)
        c.commit(offsets=[TopicPartition(t, p, ends[(t, p)]) for t, p in parts], asynchronous=False)
    finally:
        c.close()


def messages(ds: Dataset) -> list[tuple[str, bytes, bytes]]:
    """Every record of the dataset as the pipeline would put it on Kafka."""
    key = ds.experiment.id.encode()
    out = [(KafkaTopics.READINGS, key, b.to_json()) for b in ds.batches]
    out += [(KafkaTopics.LATE, key, b.to_json()) for b in ds.batches[:3]]
    out += [(KafkaTopics.KPIS, key, encode_kpis(ds.kpis[k : k + 3])) for k in range(0, len(ds.kpis), 3)]
    out += [(KafkaTopics.DEVICE_STATUS, key, s.to_json()) for s in ds.statuses]
    out += [(KafkaTopics.REJECTIONS, key, r.to_json()) for r in ds.rejections]
    return out


def produce(bootstrap: str, msgs: list[tuple[str, bytes, bytes]]) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": False, "acks": "all"})
    for topic, key, value in msgs:
        p.produce(topic, value=value, key=key)
    assert p.flush(60) == 0


def start_sink(stack_state, log: Path, group: str, **env: str) -> subprocess.Popen:
    full = {
        **os.environ,
        **stack_state.env(),
        "PILOTLAB_SINK_GROUP": group,
        "PILOTLAB_SINK_BATCH_SIZE": "5",
        "PILOTLAB_SINK_METRICS_PORT": str(free_port()),
        **{f"PILOTLAB_{k.upper()}": v for k, v in env.items()},
    }
    with open(log, "ab") as fh:
        # unsupervised: the test hook's exit 137 must end the process, not be restarted
        return subprocess.Popen(
            [sys.executable, "-m", "control", "run", "sink", "--no-supervise"],
            env=full,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stored(url: str, ds: Dataset) -> dict[str, object]:
    exp = ds.experiment.id
    with psycopg.connect(url, connect_timeout=5) as conn:
        q = conn.execute
        return {
            "readings": {
                (d, m, to_ms(ts)): v
                for d, m, ts, v in q(
                    "SELECT device_id, metric, ts, value FROM readings WHERE experiment_id = %s", (exp,)
                )
            },
            "readings_rows": q("SELECT count(*) FROM readings WHERE experiment_id = %s", (exp,)).fetchone()[0],
            "late": q("SELECT count(*) FROM late_readings WHERE experiment_id = %s", (exp,)).fetchone()[0],
            "kpis": q("SELECT count(*), sum(value) FROM kpi_values WHERE experiment_id = %s", (exp,)).fetchone(),
            "status": q("SELECT count(*) FROM device_status WHERE experiment_id = %s", (exp,)).fetchone()[0],
            "rejections": q("SELECT count(*) FROM rejections WHERE experiment_id = %s", (exp,)).fetchone()[0],
        }


def expected(ds: Dataset) -> dict[str, object]:
    late = sum(len(r.metrics) for b in ds.batches[:3] for r in b.readings)
    return {
        "readings": ds.rows(),
        "readings_rows": len(ds.rows()),
        "late": late,
        "kpis": (len(ds.kpis), pytest.approx(sum(k.value for k in ds.kpis))),
        "status": len(ds.statuses),
        "rejections": len(ds.rejections),
    }


def wait_all_stored(stack_state, proc: subprocess.Popen, log: Path, ds: Dataset, group: str) -> None:
    want = expected(ds)
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, f"sink exited with {proc.returncode}: {log.read_text()[-3000:]}"
        try:
            got = stored(stack_state.database_url, ds)
        except psycopg.OperationalError:
            got = None
        if got == want and group_lag(stack_state.kafka_bootstrap, group, TOPICS) == 0:
            return
        if time.monotonic() > deadline:
            summary = {k: (len(v) if isinstance(v, dict) else v) for k, v in (got or {}).items()}
            pytest.fail(f"not all stored after 180 s: {summary} vs {len(ds.rows())} readings; log: {log}")
        time.sleep(0.5)


def test_crash_between_database_commit_and_offset_commit_stores_nothing_twice(stack_state, tmp_path):
    ds = build("sk1")
    group = "test-sink-fault"
    start_at_end(stack_state.kafka_bootstrap, group)
    msgs = messages(ds)
    produce(stack_state.kafka_bootstrap, msgs)
    # (tansu advances offsets per record batch, so the lag is measured, not len(msgs))
    published_lag = group_lag(stack_state.kafka_bootstrap, group, TOPICS)
    assert published_lag > 0
    log = tmp_path / "sink.log"

    crashing = start_sink(stack_state, log, group, sink_fault_after_db_commit="1")
    try:
        assert crashing.wait(120) == 137, log.read_text()[-3000:]
    finally:
        stop(crashing)
    assert "test fault hook: exiting after database commit 1" in log.read_text()
    # the crash window: the first batch is in the database, its offsets are not committed
    partial = stored(stack_state.database_url, ds)
    assert partial["readings_rows"] + partial["late"] + partial["status"] + partial["rejections"] > 0
    assert group_lag(stack_state.kafka_bootstrap, group, TOPICS) == published_lag

    sink = start_sink(stack_state, log, group)
    try:
        wait_all_stored(stack_state, sink, log, ds, group)
    finally:
        stop(sink)
    assert stored(stack_state.database_url, ds) == expected(ds)


def test_postgres_stopped_mid_stream_and_restarted_loses_nothing(stack_state, stack, tmp_path):
    ds = build("sk2")
    group = "test-sink-outage"
    start_at_end(stack_state.kafka_bootstrap, group)
    msgs = messages(ds)
    first, rest = msgs[:8], msgs[8:]
    log = tmp_path / "sink.log"
    sink = start_sink(stack_state, log, group)
    try:
        produce(stack_state.kafka_bootstrap, first)
        deadline = time.monotonic() + 120
        while stored(stack_state.database_url, ds)["readings_rows"] == 0:
            assert time.monotonic() < deadline, f"nothing stored before the outage; log: {log}"
            time.sleep(0.3)
        try:
            assert stack.stop_service("postgres")
            produce(stack_state.kafka_bootstrap, rest)
            deadline = time.monotonic() + 120
            while "retrying" not in log.read_text():
                assert sink.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, f"the sink never noticed the outage; log: {log}"
                time.sleep(0.3)
        finally:
            stack.up()
        assert stack.load().database_url == stack_state.database_url  # back at the same address
        wait_all_stored(stack_state, sink, log, ds, group)
    finally:
        stop(sink)
    assert stored(stack_state.database_url, ds) == expected(ds)
