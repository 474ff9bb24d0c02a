"""Prometheus metrics, liveness and readiness of the sink (``pilotlab run sink``).

``storage.sink`` calls :class:`SinkObserver` at each step of its loop; the HTTP server
(``/metrics``, ``/healthz``, ``/readyz``) and the lag thread start in the sink process only
(``storage.sink.main``).

Lag per partition: the true end offset (``pilotlab.kafka_admin.end_offsets``, once per 10 s)
minus the sink's position — the offset after the last record it stored, kept by the sink
itself; for a partition it has not consumed from since it was assigned, the group's committed
offset (one OffsetFetch by the lag thread; the sink commits right after storing).

Readiness: the database is connected, the consumer has its assignment (after the last
rebalance), and the Kafka client does not report every broker down.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter as Tally

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from prometheus_client import Counter, Gauge, Histogram

from pilotlab.errorlog import ErrorLog
from pilotlab.health import Health, serve
from pilotlab.lag import LagMonitor
from pilotlab.settings import SinkSettings

RECORDS_IN = Counter("pilotlab_sink_records_total", "Kafka records consumed into batches", ["topic"])
ROWS = Counter(
    "pilotlab_sink_rows_written_total",
    "Rows inserted or updated, per table (a replayed row the upsert leaves alone does not count)",
    ["table"],
)
REFUSED = Counter(
    "pilotlab_sink_refused_records_total",
    "Records stored as storage_refused rejections: refused by the database, or undecodable",
    ["cause"],
)
BATCH_RECORDS = Histogram(
    "pilotlab_sink_batch_records",
    "Records per batch (one database transaction)",
    buckets=(1, 5, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000),
)
BATCH_SECONDS = Histogram(
    "pilotlab_sink_batch_seconds",
    "Per batch: consumed → stored in the database → offsets committed (retries included)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
DB_COMMIT_SECONDS = Histogram(
    "pilotlab_sink_db_commit_seconds",
    "One batch's database transaction, writes and commit (successful attempts)",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
DB_RETRIES = Counter(
    "pilotlab_sink_db_retries_total",
    "A batch written again: database unavailable (cause=unavailable, after a back-off) or a record refused "
    "(cause=refused: record by record)",
    ["cause"],
)
OFFSET_COMMIT_FAILURES = Counter(
    "pilotlab_sink_offset_commit_failures_total", "Kafka offset commits that failed after the database commit"
)
KAFKA_ERRORS = Counter("pilotlab_sink_kafka_errors_total", "Kafka consumer errors", ["error"])
ASSIGNED = Gauge("pilotlab_sink_assigned_partitions", "Partitions the sink's consumer owns")
LAG = Gauge(
    "pilotlab_sink_lag_records",
    "Records not yet stored: true end offset − the sink's position",
    ["topic", "partition"],
)
LAG_UPDATED = Gauge("pilotlab_sink_lag_updated_timestamp_seconds", "When the lag gauges were last set (Unix time)")
LAG_ERRORS = Counter("pilotlab_sink_lag_errors_total", "Failed end-offset reads of the lag thread")
READY = Gauge("pilotlab_sink_ready", "1 when /readyz answers 200")
SINCE_BEAT = Gauge("pilotlab_sink_seconds_since_heartbeat", "Seconds since the sink's loop last ran")

for _cause in ("database", "undecodable"):
    REFUSED.labels(_cause)  # shown as 0 from the start
for _cause in ("unavailable", "refused"):
    DB_RETRIES.labels(_cause)

Partition = tuple[str, int]


class SinkObserver:
    def __init__(self, settings: SinkSettings) -> None:
        self.settings = settings
        self.health = Health("sink", ("database_connected", "partitions_assigned", "kafka_reachable"))
        self.health.set("kafka_reachable", True)  # until the client says every broker is down
        self._lock = threading.Lock()
        self._assigned: frozenset[Partition] = frozenset()
        self._positions: dict[Partition, int] = {}
        self._offsets: Consumer | None = None  # the lag thread's, for committed offsets
        self._next_probe = 0.0
        self._client_errors = ErrorLog(logging.getLogger("pilotlab.sink"), "Kafka client")
        READY.set_function(self.health.is_ready)
        SINCE_BEAT.set_function(self.health.since_beat)

    # the consumer's rebalance callbacks (the sink's thread, inside consume) ------------------
    def on_assign(self, _consumer, partitions) -> None:
        with self._lock:
            self._assigned = frozenset((tp.topic, tp.partition) for tp in partitions)
        ASSIGNED.set(len(partitions))
        self.health.set("partitions_assigned", True)
        self._reachable()

    def on_revoke(self, _consumer, partitions) -> None:
        gone = {(tp.topic, tp.partition) for tp in partitions}
        with self._lock:
            self._assigned = frozenset(self._assigned - gone)
            for tp in gone:
                self._positions.pop(tp, None)  # another member may consume it meanwhile
        self.health.set("partitions_assigned", False)

    # the sink's loop ---------------------------------------------------------------------------------
    def kafka_error(self, err) -> None:
        """An error consume() returned (the sink logs those itself)."""
        KAFKA_ERRORS.labels(err.name()).inc()

    def client_error(self, err) -> None:
        """librdkafka's error_cb (in the sink's thread, inside consume): client-wide errors."""
        KAFKA_ERRORS.labels(err.name()).inc()
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            self.health.set("kafka_reachable", False)
        self._client_errors.failed(f"{err.name()}: {err.str()}")

    def _reachable(self) -> None:
        self.health.set("kafka_reachable", True)
        if self._client_errors.since is not None:
            self._client_errors.ok()

    def probe_kafka(self, consumer) -> None:
        """After every broker was reported down, ask for metadata every 5 s until one answers:
        /readyz recovers without traffic or a rebalance (a consumed record also clears it)."""
        if self.health.condition("kafka_reachable") or time.monotonic() < self._next_probe:
            return
        self._next_probe = time.monotonic() + 5.0
        try:
            consumer.list_topics(timeout=2)
        except KafkaException:
            return
        self._reachable()

    def consumed(self, records) -> None:
        self._reachable()
        for topic, n in Tally(r.topic for r in records).items():
            RECORDS_IN.labels(topic).inc(n)
        BATCH_RECORDS.observe(len(records))

    def database(self, connected: bool) -> None:
        self.health.set("database_connected", connected)

    def stored(self, counts: dict[str, int], undecodable: int) -> None:
        for table, n in counts.items():
            if table != "refused":
                ROWS.labels(table).inc(n)
        if counts.get("refused"):
            REFUSED.labels("database").inc(counts["refused"])
        if undecodable:
            REFUSED.labels("undecodable").inc(undecodable)

    def done(self, offsets: dict[Partition, int], seconds: float) -> None:
        """A batch stored (and its offsets committed, or tried)."""
        with self._lock:
            for tp, offset in offsets.items():
                if tp in self._assigned:
                    self._positions[tp] = offset
        BATCH_SECONDS.observe(seconds)

    # the lag thread --------------------------------------------------------------------------------
    def positions(self) -> dict[Partition, int | None] | None:
        if not self.health.condition("partitions_assigned"):
            return None
        with self._lock:
            return {tp: self._positions.get(tp) for tp in self._assigned}

    def committed(self, partitions: list[Partition]) -> dict[Partition, int | None]:
        if self._offsets is None:
            self._offsets = Consumer(
                {
                    "bootstrap.servers": self.settings.kafka_bootstrap,
                    "group.id": self.settings.sink_group,  # reads the group's offsets; never joins it
                    "enable.auto.commit": False,
                }
            )
        got = self._offsets.committed([TopicPartition(t, p) for t, p in partitions], timeout=10)
        return {(tp.topic, tp.partition): tp.offset if tp.offset >= 0 else None for tp in got}

    # the sink process ------------------------------------------------------------------------------
    def serve(self) -> LagMonitor:
        """The HTTP server (port 0: none) and the lag thread."""
        if self.settings.sink_metrics_port:
            serve(self.settings.sink_metrics_port, self.health, setting="PILOTLAB_SINK_METRICS_PORT")
        return LagMonitor(
            self.settings.kafka_bootstrap,
            self.positions,
            LAG,
            updated=LAG_UPDATED,
            errors=LAG_ERRORS,
            resolve=self.committed,
            name="sink-lag",
        ).start()
