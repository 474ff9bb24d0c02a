"""The sink: Kafka → PostgreSQL/TimescaleDB, in batches, exactly-once in effect.

Order of operations per batch: consume → write every row in one database transaction →
commit that transaction → commit the Kafka offsets. A crash between the two commits
replays the batch, and the natural-key upserts make the replay a no-op. A database outage
is retried with backoff (by exception class) on the same batch, so nothing is skipped.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

import psycopg
from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

from pilotlab.contracts import KafkaTopics, ReadingBatch, Rejection, decode_kpis
from pilotlab.manifest import Experiment
from pilotlab.settings import SinkSettings
from storage import writer

log = logging.getLogger("pilotlab.sink")

TOPICS = (KafkaTopics.READINGS, KafkaTopics.KPIS, KafkaTopics.REJECTIONS, KafkaTopics.REGISTRY)


@dataclass
class Batch:
    readings: list[ReadingBatch] = field(default_factory=list)
    kpis: list = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    experiments: dict[str, Experiment] = field(default_factory=dict)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)

    def add(self, msg: Message) -> None:
        topic, value = msg.topic(), msg.value()
        if topic == KafkaTopics.READINGS:
            self.readings.append(ReadingBatch.from_json(value))
        elif topic == KafkaTopics.KPIS:
            self.kpis.extend(decode_kpis(value))
        elif topic == KafkaTopics.REJECTIONS:
            self.rejections.append(Rejection.from_json(value))
        elif topic == KafkaTopics.REGISTRY:
            exp = Experiment.from_json(value)
            self.experiments[exp.id] = exp
        self.offsets[(topic, msg.partition())] = msg.offset() + 1

    def commit_offsets(self) -> list[TopicPartition]:
        return [TopicPartition(t, p, o) for (t, p), o in self.offsets.items()]


def write_batch(conn: psycopg.Connection, batch: Batch) -> dict[str, int]:
    """All of a batch in one transaction. Experiments first: readings refer to them."""
    with conn.transaction():
        return {
            "experiments": writer.write_experiments(conn, batch.experiments.values()),
            "readings": writer.write_readings(conn, batch.readings),
            "kpis": writer.write_kpis(conn, batch.kpis),
            "rejections": writer.write_rejections(conn, batch.rejections),
        }


class Sink:
    def __init__(self, settings: SinkSettings) -> None:
        self.settings = settings
        self.stopping = threading.Event()
        self.totals: dict[str, int] = defaultdict(int)

    def _consumer(self) -> Consumer:
        return Consumer(
            {
                "bootstrap.servers": self.settings.kafka_bootstrap,
                "group.id": self.settings.sink_group,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "session.timeout.ms": self.settings.kafka_session_timeout_ms,
                "heartbeat.interval.ms": max(500, self.settings.kafka_session_timeout_ms // 6),
            }
        )

    def _connect(self) -> psycopg.Connection:
        delay = 0.5
        while True:
            try:
                return psycopg.connect(self.settings.database_url, connect_timeout=5)
            except psycopg.OperationalError as exc:
                if self.stopping.is_set():
                    raise
                log.warning("database unreachable (%s); retrying in %.1f s", str(exc).strip()[:120], delay)
                time.sleep(delay)
                delay = min(delay * 2, 10)

    def _store(self, conn: psycopg.Connection, batch: Batch) -> psycopg.Connection:
        """Write the batch, retrying through database outages; returns the live connection."""
        delay = 0.5
        while True:
            try:
                counts = write_batch(conn, batch)
                for k, v in counts.items():
                    self.totals[k] += v
                return conn
            except psycopg.OperationalError as exc:
                log.warning(
                    "database write failed (%s); retrying the batch in %.1f s", str(exc).strip()[:120], delay
                )
                conn.close()
                time.sleep(delay)
                delay = min(delay * 2, 10)
                conn = self._connect()

    def run(self) -> None:
        consumer = self._consumer()
        consumer.subscribe(list(TOPICS))
        conn = self._connect()
        log.info("sink started: %s → %s", self.settings.kafka_bootstrap, _redact(self.settings.database_url))
        try:
            while not self.stopping.is_set():
                msgs = consumer.consume(
                    self.settings.sink_batch_size, self.settings.sink_batch_wait_ms / 1000
                )
                batch = Batch()
                for msg in msgs:
                    err = msg.error()
                    if err is not None:
                        if err.code() != KafkaError._PARTITION_EOF:
                            log.warning("consumer: %s", err)
                        continue
                    batch.add(msg)
                if not batch.offsets:
                    continue
                conn = self._store(conn, batch)
                consumer.commit(offsets=batch.commit_offsets(), asynchronous=False)
        finally:
            conn.close()
            consumer.close()
            log.info("sink stopped; rows written: %s", dict(self.totals))


def _redact(url: str) -> str:
    """postgresql://user:secret@host → postgresql://user:***@host"""
    head, sep, tail = url.partition("@")
    if not sep or ":" not in head.split("//", 1)[-1]:
        return url
    scheme_user = head.rsplit(":", 1)[0]
    return f"{scheme_user}:***@{tail}"


def main(settings: SinkSettings) -> None:
    sink = Sink(settings)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sink.stopping.set())
    sink.run()
