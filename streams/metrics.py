"""Prometheus metrics, liveness and readiness of the streams worker (``pilotlab run streams``).

Wired into the Faust app by :class:`StreamsObserver` (``streams.app`` keeps only the calls):

- a Faust sensor counts the records the worker's streams receive and the records it sends
  (per topic, once the broker confirmed them), and the rebalances;
- the agent reports each chunk (:meth:`StreamsObserver.chunk`): messages, readings, KPI
  revisions, late readings, device transitions, state entries written, durations;
- a small mode service run by the Faust worker beats the liveness heartbeat every second from
  the worker's event loop (before and during table recovery too, unlike Faust's timers) and
  measures the state table every 15 s;
- the lag of each ``pilotlab.readings`` partition the worker owns is its true end offset minus
  the partition's applied mark (the next offset the worker will apply, from its own state
  table: no broker request), read every 10 s in a background thread (``pilotlab.lag``).

Readiness (``/readyz``): the registry is loaded and the worker's last rebalance completed
(partitions assigned and their state recovered). ``serve`` starts the HTTP server and the lag
thread; it runs only in the worker process (``streams.app.main``).
"""

from __future__ import annotations

import logging
import time
from collections import Counter as Tally

import faust
from mode import Service
from prometheus_client import Counter, Gauge, Histogram

from pilotlab.contracts import KafkaTopics
from pilotlab.health import Health, serve
from pilotlab.lag import LagMonitor
from streams.checkpoint import ChunkOut, read_mark

log = logging.getLogger("pilotlab.streams")

RECORDS_IN = Counter("pilotlab_streams_records_in_total", "Kafka records delivered to the worker's streams", ["topic"])
RECORDS_OUT = Counter(
    "pilotlab_streams_records_out_total",
    "Records the worker sent, once the broker confirmed them (KPIs, late readings, device status, state changelog)",
    ["topic"],
)
SEND_ERRORS = Counter("pilotlab_streams_send_errors_total", "Records the broker did not take", ["topic"])
APPLIED = Counter(
    "pilotlab_streams_applied_messages_total",
    "pilotlab.readings records run through the engine (a record packs one or more MQTT messages' batches)",
)
READINGS_IN = Counter("pilotlab_streams_readings_in_total", "Readings in the messages applied")
SKIPPED = Counter(
    "pilotlab_streams_skipped_messages_total",
    "Messages delivered again and skipped: applied before (below their partition's mark)",
)
HELD_BACK = Counter(
    "pilotlab_streams_held_back_messages_total",
    "Messages delivered past a gap in their partition's offsets, held back until the records "
    "in between come (the partition is sought back to its mark: streams.checkpoint.admit)",
)
REWINDS = Counter(
    "pilotlab_streams_rewinds_total",
    "Seeks of a readings partition back to the offset its state expects (a gap in the offsets delivered)",
)
CHUNK_MESSAGES = Histogram(
    "pilotlab_streams_chunk_messages",
    "Messages applied per chunk and partition",
    buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000),
)
CHUNK_SECONDS = Histogram(
    "pilotlab_streams_chunk_seconds",
    "Per chunk and partition: the engine (stage=compute), then its outputs, state entries and mark "
    "confirmed by the broker (stage=write)",
    ["stage"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
KPI_REVISIONS = Counter(
    "pilotlab_streams_kpi_revisions_total", "KPI window values sent (each a new revision of its window)", ["kind"]
)
LATE_READINGS = Counter(
    "pilotlab_streams_late_readings_total", "Readings too late for their KPI windows, sent to pilotlab.late"
)
TRANSITIONS = Counter(
    "pilotlab_streams_device_transitions_total", "Device status changes sent to pilotlab.device-status", ["status"]
)
STATE_WRITES = Counter(
    "pilotlab_streams_state_writes_total", "State entries written to the changelog (the partitions' marks included)"
)
STATE_KEYS = Gauge(
    "pilotlab_streams_state_keys", "Entries in the worker's state table (windows, devices, experiments, marks)"
)
STATE_BYTES = Gauge("pilotlab_streams_state_bytes", "Bytes of the state table's keys and values")
REBALANCES = Counter("pilotlab_streams_rebalances_total", "Consumer-group rebalances the worker went through")
ASSIGNED = Gauge(
    "pilotlab_streams_assigned_partitions", "pilotlab.readings partitions the worker owns after its last rebalance"
)
LAG = Gauge(
    "pilotlab_streams_lag_records",
    "Records not yet applied: true end offset − the partition's applied mark",
    ["topic", "partition"],
)
LAG_UPDATED = Gauge("pilotlab_streams_lag_updated_timestamp_seconds", "When the lag gauges were last set (Unix time)")
LAG_ERRORS = Counter("pilotlab_streams_lag_errors_total", "Failed end-offset reads of the lag thread")
READY = Gauge("pilotlab_streams_ready", "1 when /readyz answers 200")
SINCE_BEAT = Gauge(
    "pilotlab_streams_seconds_since_heartbeat", "Seconds since the worker's event loop last ran the heartbeat"
)

STATE_EVERY_S = 15.0


class _Sensor(faust.Sensor):
    """Faust's own hooks: records in and out per topic, rebalances."""

    def on_message_in(self, tp, offset, message) -> None:
        RECORDS_IN.labels(tp.topic).inc()

    def on_send_initiated(self, producer, topic, message, keysize, valsize):
        return topic

    def on_send_completed(self, producer, state, metadata) -> None:
        RECORDS_OUT.labels(metadata.topic).inc()

    def on_send_error(self, producer, exc, state) -> None:
        SEND_ERRORS.labels(state if isinstance(state, str) else "").inc()

    def on_rebalance_start(self, app) -> dict:
        REBALANCES.inc()
        return {}


class _Heartbeat(Service):
    """Run by the Faust worker beside the app, from its start: beats from the event loop."""

    def __init__(self, observer: StreamsObserver, **kwargs) -> None:
        self.observer = observer
        super().__init__(**kwargs)

    @Service.timer(1.0)
    async def _beat(self) -> None:
        self.observer.tick()


class StreamsObserver:
    def __init__(self, app: faust.App, state, registry, bootstrap: str) -> None:
        self.app, self.state, self.registry, self.bootstrap = app, state, registry, bootstrap
        self.health = Health("streams", ("rebalance_completed",))
        self.health.watch("registry_loaded", registry.ready.is_set)
        self.assigned: frozenset[int] = frozenset()
        self._measured = 0.0
        READY.set_function(self.health.is_ready)
        SINCE_BEAT.set_function(self.health.since_beat)
        app.sensors.add(_Sensor())
        app.on_partitions_assigned.connect(self._on_assigned)
        app.on_partitions_revoked.connect(self._on_revoked)
        app.on_rebalance_complete.connect(self._on_rebalance_complete)

    # Faust's signals (on the event loop) ------------------------------------------------------
    async def _on_assigned(self, _app, assigned, **_kw) -> None:
        self.assigned = frozenset(tp.partition for tp in assigned if tp.topic == KafkaTopics.READINGS)

    async def _on_revoked(self, _app, _revoked, **_kw) -> None:
        self.health.set("rebalance_completed", False)

    async def _on_rebalance_complete(self, _app, **_kw) -> None:
        ASSIGNED.set(len(self.assigned))
        self.health.set("rebalance_completed", True)

    # the agent ---------------------------------------------------------------------------------
    def chunk(self, messages: list, out: ChunkOut, compute_s: float, write_s: float) -> None:
        """A partition's chunk, applied and written."""
        records = len({offset for offset, _batch, _exp in messages})  # a packed record holds several batches
        APPLIED.inc(records)
        READINGS_IN.inc(sum(len(batch.readings) for _offset, batch, _exp in messages))
        CHUNK_MESSAGES.observe(records)
        CHUNK_SECONDS.labels("compute").observe(compute_s)
        CHUNK_SECONDS.labels("write").observe(write_s)
        for kind, n in Tally(v.kind for values in out.kpis.values() for v in values).items():
            KPI_REVISIONS.labels(kind).inc(n)
        LATE_READINGS.inc(sum(len(held.readings) for held in out.late))
        for status, n in Tally(t.status for t in out.transitions).items():
            TRANSITIONS.labels(status).inc(n)
        STATE_WRITES.inc(len(out.writes))
        STATE_KEYS.set(len(self._store()))  # O(1): current after every chunk

    def skipped(self, n: int) -> None:
        if n:
            SKIPPED.inc(n)

    def held_back(self, n: int) -> None:
        HELD_BACK.inc(n)

    def rewound(self) -> None:
        REWINDS.inc()

    def _store(self) -> dict:
        """The state table's dict (the memory store's ``data``)."""
        data = self.state.data
        return getattr(data, "data", data)

    # the heartbeat (event loop) ------------------------------------------------------------------
    def tick(self) -> None:
        self.health.beat()
        now = time.monotonic()
        if now - self._measured >= STATE_EVERY_S:
            self._measured = now
            raw = self._store()
            STATE_KEYS.set(len(raw))  # also after recovery, when no chunk ran yet
            STATE_BYTES.set(sum(len(k) + len(v or b"") for k, v in list(raw.items())))

    # lag (the lag thread) -------------------------------------------------------------------------
    def positions(self) -> dict[tuple[str, int], int] | None:
        """Each owned readings partition's applied mark; None while the worker rebalances (the
        marks of partitions being recovered are not current)."""
        if not self.health.condition("rebalance_completed"):
            return None
        raw = self._store()

        def stored(key: str) -> bytes | None:
            return raw.get(key.encode())

        return {(KafkaTopics.READINGS, p): read_mark(stored, p) for p in self.assigned}

    # the worker process ---------------------------------------------------------------------------
    def serve(self, port: int) -> LagMonitor:
        """The HTTP server (/metrics, /healthz, /readyz; port 0: none) and the lag thread."""
        if port:
            serve(port, self.health, setting="PILOTLAB_STREAMS_METRICS_PORT")
        return LagMonitor(
            self.bootstrap, self.positions, LAG, updated=LAG_UPDATED, errors=LAG_ERRORS, name="streams-lag"
        ).start()

    def service(self) -> Service:
        """The heartbeat service to run in the Faust worker (``Worker(app, observer.service())``)."""
        return _Heartbeat(self)
