"""The sink: Kafka → PostgreSQL/TimescaleDB, in batches, exactly-once in effect.

Order of operations per batch: consume → write every row in one database transaction →
commit that transaction → commit the Kafka offsets. A crash between the two commits
replays the batch, and the natural-key upserts make the replay a no-op. A database outage
is retried with backoff (by exception class) on the same batch, so nothing is skipped.

A record the database refuses (a NUL byte in a text field, a broken constraint) or that
cannot be decoded does not block its partition: the batch is retried record by record,
each in its own savepoint, and each refused record is stored in ``rejections`` with the
reason ``storage_refused`` and the database's message.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

import orjson
import psycopg
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from pilotlab.contracts import (
    DeviceStatus,
    KafkaTopics,
    ReadingBatch,
    Reason,
    Rejection,
    decode_kpis,
    excerpt,
    to_ms,
    utcnow,
)
from pilotlab.errorlog import ErrorLog
from pilotlab.manifest import Experiment
from pilotlab.settings import SinkSettings
from storage import writer
from storage.metrics import DB_COMMIT_SECONDS, DB_RETRIES, OFFSET_COMMIT_FAILURES, SinkObserver
from storage.migrate import installed_mode

log = logging.getLogger("pilotlab.sink")

TOPICS = (
    KafkaTopics.READINGS,
    KafkaTopics.KPIS,
    KafkaTopics.REJECTIONS,
    KafkaTopics.REGISTRY,
    KafkaTopics.LATE,
    KafkaTopics.DEVICE_STATUS,
)

# what "the database refused this row" looks like: bad data or a broken constraint
REFUSED = (psycopg.DataError, psycopg.IntegrityError)
# what "this Kafka value is not the record its topic promises" looks like
UNDECODABLE = (orjson.JSONDecodeError, ValueError, KeyError, TypeError)


@dataclass(frozen=True)
class Record:
    """One consumed Kafka message (what the sink needs of it)."""

    topic: str
    partition: int
    offset: int
    value: bytes
    timestamp_ms: int | None = None


@dataclass
class Batch:
    readings: list[writer.IncomingReadings] = field(default_factory=list)
    late: list[ReadingBatch] = field(default_factory=list)
    kpis: list = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    statuses: list[DeviceStatus] = field(default_factory=list)
    experiments: dict[str, Experiment] = field(default_factory=dict)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    records: list[Record] = field(default_factory=list)
    undecodable: int = 0

    def add(self, msg: Message) -> None:
        ts_type, ts = msg.timestamp()
        self.add_record(Record(msg.topic(), msg.partition(), msg.offset(), msg.value() or b"", ts if ts_type else None))

    def add_record(self, rec: Record) -> None:
        self.records.append(rec)
        self.offsets[(rec.topic, rec.partition)] = rec.offset + 1
        try:
            self._decode(rec)
        except UNDECODABLE as exc:
            self.undecodable += 1
            self.rejections.append(storage_refusal(rec, f"undecodable record: {type(exc).__name__}: {exc}"))

    def _decode(self, rec: Record) -> None:
        topic, value = rec.topic, rec.value
        if topic == KafkaTopics.READINGS:
            self.readings.extend(writer.IncomingReadings.all_from_json(value))  # the lean decode
        elif topic == KafkaTopics.LATE:
            self.late.append(ReadingBatch.from_json(value))
        elif topic == KafkaTopics.KPIS:
            self.kpis.extend(decode_kpis(value))
        elif topic == KafkaTopics.REJECTIONS:
            self.rejections.append(Rejection.from_json(value))
        elif topic == KafkaTopics.DEVICE_STATUS:
            self.statuses.append(DeviceStatus.from_json(value))
        elif topic == KafkaTopics.REGISTRY:
            exp = Experiment.from_json(value)
            self.experiments[exp.id] = exp

    def commit_offsets(self) -> list[TopicPartition]:
        return [TopicPartition(t, p, o) for (t, p), o in self.offsets.items()]


def _clean(text: str | None, limit: int = 500) -> str | None:
    """Text that PostgreSQL accepts (no NUL), bounded."""
    return None if text is None else text.replace("\x00", "\\0")[:limit]


def storage_refusal(rec: Record, detail: str) -> Rejection:
    """The rejection stored for a record the database refused. Its id depends only on the
    record, so a replay of the same record is stored once."""
    ids: dict = {}
    try:
        decoded = orjson.loads(rec.value)
        if isinstance(decoded, dict):
            ids = decoded
    except orjson.JSONDecodeError:
        pass

    def ident(key: str) -> str | None:
        v = ids.get(key)
        return v if isinstance(v, str) and "\x00" not in v and len(v) <= 200 else None

    reason = str(Reason.STORAGE_REFUSED)
    return Rejection(
        reason=Reason.STORAGE_REFUSED,
        detail=_clean(detail) or "",
        topic=rec.topic,
        received_ms=rec.timestamp_ms if rec.timestamp_ms is not None else to_ms(utcnow()),
        experiment_id=ident("experiment_id"),
        device_id=ident("device_id"),
        excerpt=excerpt(rec.value),
        rejection_id=Rejection.make_id(rec.topic, f"{rec.partition}:{rec.offset}:".encode() + rec.value, None, reason),
    )


def unpacked(rec: Record) -> list[Record]:
    """A packed ``pilotlab.readings`` record (a JSON array of several MQTT messages' batches,
    ``pilotlab.contracts.pack_batches``) as one record per batch, so that the slow path
    refuses only the batch the database refused; any other record as it is."""
    if rec.topic != KafkaTopics.READINGS or rec.value[:1] != b"[":
        return [rec]
    try:
        items = orjson.loads(rec.value)
    except orjson.JSONDecodeError:
        return [rec]
    if not isinstance(items, list) or not items:
        return [rec]
    return [Record(rec.topic, rec.partition, rec.offset, orjson.dumps(item), rec.timestamp_ms) for item in items]


def write_batch(conn: psycopg.Connection, batch: Batch) -> dict[str, int]:
    """All of a batch in one transaction. Experiments first: devices refer to them."""
    with conn.transaction():
        return _write(conn, batch)


def _write(conn: psycopg.Connection, batch: Batch) -> dict[str, int]:
    return {
        "experiments": writer.write_experiments(conn, batch.experiments.values()),
        "readings": writer.write_readings(conn, batch.readings),
        "late_readings": writer.write_late_readings(conn, batch.late),
        "kpis": writer.write_kpis(conn, batch.kpis),
        "device_status": writer.write_device_status(conn, batch.statuses),
        "rejections": writer.write_rejections(conn, batch.rejections),
    }


def write_record_by_record(conn: psycopg.Connection, batch: Batch) -> dict[str, int]:
    """The slow path after the database refused a batch: one savepoint per record; a refused
    record becomes a ``storage_refused`` rejection. Still one transaction for the batch."""
    totals: dict[str, int] = defaultdict(int)
    with conn.transaction():
        for rec in (one for packed in batch.records for one in unpacked(packed)):
            single = Batch()
            single.add_record(rec)
            try:
                with conn.transaction():
                    counts = _write(conn, single)
            except REFUSED as exc:
                sqlstate = getattr(exc, "sqlstate", None) or "client"
                log.warning(
                    "database refused %s[%d]@%d (%s): stored as a storage_refused rejection",
                    rec.topic,
                    rec.partition,
                    rec.offset,
                    sqlstate,
                )
                refusal = storage_refusal(rec, f"{sqlstate}: {str(exc).strip()}")
                counts = {"rejections": writer.write_rejections(conn, [refusal]), "refused": 1}
            for k, v in counts.items():
                totals[k] += v
    return dict(totals)


class Sink:
    def __init__(self, settings: SinkSettings) -> None:
        self.settings = settings
        self.stopping = threading.Event()
        self.totals: dict[str, int] = defaultdict(int)
        self.db_commits = 0
        self.commit_failures = 0
        self.observe = SinkObserver(settings)  # storage.metrics: /metrics, /healthz, /readyz

    def _consumer(self) -> Consumer:
        return Consumer(
            {
                "bootstrap.servers": self.settings.kafka_bootstrap,
                "group.id": self.settings.sink_group,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "session.timeout.ms": self.settings.kafka_session_timeout_ms,
                "heartbeat.interval.ms": max(500, self.settings.kafka_session_timeout_ms // 6),
                "fetch.wait.max.ms": self.settings.kafka_fetch_wait_ms,
                # client-wide errors (every broker down...): counted, and /readyz (storage.metrics)
                "error_cb": self.observe.client_error,
            }
        )

    def _connect(self) -> psycopg.Connection:
        delay = 0.5
        while True:
            try:
                # autocommit: every write is inside an explicit conn.transaction()
                conn = psycopg.connect(self.settings.database_url, connect_timeout=5, autocommit=True)
                self.observe.database(True)
                return conn
            except psycopg.OperationalError as exc:
                self.observe.database(False)
                self.observe.health.beat()  # waiting for the database is alive, not ready
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
                started = time.perf_counter()
                try:
                    counts = write_batch(conn, batch)
                except REFUSED as exc:
                    log.warning(
                        "database refused a batch of %d records (%s); retrying record by record",
                        len(batch.records),
                        type(exc).__name__,
                    )
                    DB_RETRIES.labels("refused").inc()
                    started = time.perf_counter()
                    counts = write_record_by_record(conn, batch)
                DB_COMMIT_SECONDS.observe(time.perf_counter() - started)
                for k, v in counts.items():
                    self.totals[k] += v
                self.observe.stored(counts, batch.undecodable)
                return conn
            except psycopg.OperationalError as exc:
                DB_RETRIES.labels("unavailable").inc()
                self.observe.database(False)
                self.observe.health.beat()
                log.warning("database write failed (%s); retrying the batch in %.1f s", str(exc).strip()[:120], delay)
                conn.close()
                time.sleep(delay)
                delay = min(delay * 2, 10)
                conn = self._connect()

    def _after_db_commit(self) -> None:
        """TEST HOOK (``PILOTLAB_SINK_FAULT_AFTER_DB_COMMIT=N``): die like ``kill -9`` right
        after the N-th database commit, before its Kafka offsets are committed."""
        self.db_commits += 1
        if self.settings.sink_fault_after_db_commit and self.db_commits == self.settings.sink_fault_after_db_commit:
            log.error("test fault hook: exiting after database commit %d, before the offset commit", self.db_commits)
            logging.shutdown()
            os._exit(137)

    def _commit(self, consumer: Consumer, batch: Batch) -> None:
        """Commit the batch's offsets. A failure (the broker restarting, the group rebalancing:
        "Unknown member") is not fatal: the rows are stored, the batch is consumed again by
        whoever gets its partitions and the upserts absorb it."""
        try:
            consumer.commit(offsets=batch.commit_offsets(), asynchronous=False)
            self.commit_failures = 0
        except KafkaException as exc:
            self.commit_failures += 1
            OFFSET_COMMIT_FAILURES.inc()
            level = logging.WARNING if self.commit_failures < 5 else logging.ERROR
            log.log(
                level,
                "offset commit failed (%s; %d in a row): the stored batch of %d records will be read again "
                "(idempotent upserts)",
                exc.args[0] if exc.args else exc,
                self.commit_failures,
                len(batch.records),
            )

    def run(self) -> None:
        consumer = self._consumer()
        observe = self.observe
        consumer.subscribe(list(TOPICS), on_assign=observe.on_assign, on_revoke=observe.on_revoke,
                           on_lost=observe.on_revoke)  # fmt: skip
        conn = self._connect()
        mode = installed_mode(conn)
        log.info(
            "sink started: %s → %s (database mode: %s)",
            self.settings.kafka_bootstrap,
            _redact(self.settings.database_url),
            mode,
        )
        errors = ErrorLog(log, "Kafka consumer")
        # what start-up made lives as long as the process: out of the cycle collector's view, so
        # the full collections a batch's allocations set off do not walk it again (as ingest does)
        gc.freeze()
        try:
            while not self.stopping.is_set():
                observe.health.beat()
                observe.probe_kafka(consumer)
                msgs = consumer.consume(self.settings.sink_batch_size, self.settings.sink_batch_wait_ms / 1000)
                started = time.perf_counter()
                batch = Batch()
                for msg in msgs:
                    err = msg.error()
                    if err is not None:
                        if err.code() != KafkaError._PARTITION_EOF:
                            errors.failed(str(err))
                            observe.kafka_error(err)
                        continue
                    batch.add(msg)
                if not batch.offsets:
                    continue
                errors.ok()
                observe.consumed(batch.records)
                conn = self._store(conn, batch)
                self._after_db_commit()
                self._commit(consumer, batch)
                observe.done(batch.offsets, time.perf_counter() - started)
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
    sink.observe.serve()  # /metrics, /healthz, /readyz and the lag thread, in this process
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sink.stopping.set())
    sink.run()
