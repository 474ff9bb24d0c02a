"""The Faust worker: a thin agent around the pure KPI engine (``streams.engine``).

``compute_kpis`` takes reading batches in chunks (``take_events``); per partition it decodes
them, finds each experiment in the registry and runs them through the engine on a working
copy of the state (``streams.checkpoint.run_chunk``: de-duplication, allowed lateness,
event-time windows, liveness). Then it sends the chunk's latest KPIs (``pilotlab.kpis``),
late readings (``pilotlab.late``) and device status changes (``pilotlab.device-status``),
keyed by experiment, waits for the broker, and writes each changed state key once to the
table's changelog with the partition's applied mark last. The offset committed for a
partition is its mark (``streams.faust_compat.commit_applied``), never beyond what the
state holds. tansu has no transactions, so a
crash is made safe by ``streams.checkpoint``: the state rolls back to the mark and the
messages after it are replayed, neither counted twice nor lost.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from pathlib import Path

import faust
from aiokafka.errors import IllegalStateError
from faust.types import TP

from pilotlab.contracts import KafkaTopics, ReadingBatch, encode_kpi_records
from pilotlab.registry import RegistryFollower
from pilotlab.settings import StreamsSettings
from streams import faust_compat
from streams.checkpoint import Chunk, ChunkOut, Rewinds, admit, collector_paused, read_mark, run_chunk
from streams.metrics import StreamsObserver

log = logging.getLogger("pilotlab.streams")


def crash_worker(what: str) -> None:
    """Crash-only: end the worker process on an error the agent cannot handle. Faust would
    restart the agent inside the live worker, past the chunk that failed: its messages never
    applied nor acked (KPIs short, lag stuck). A new worker (``pilotlab run streams``
    supervises it) rolls the state back to its mark and replays from the committed offsets."""
    log.exception("%s; ending the worker so that it restarts from its last mark", what)
    logging.shutdown()
    os._exit(70)


def _offset(event) -> int:
    return event.message.offset


class Rewinder:
    """Seeks a readings partition back to the offset its state expects when the messages
    delivered skip past it (``streams.checkpoint.admit``; ``app`` is the Faust app, for its
    consumer)."""

    def __init__(self, app, observer: StreamsObserver, clock=time.monotonic, retry_s: float = 10.0) -> None:
        self.app, self.observer, self.clock = app, observer, clock
        self.rewinds = Rewinds(retry_s)

    async def take_past_gap(self, partition: int, expected: int, offset: int) -> bool:
        """A partition's message at ``offset`` while its state expects ``expected``: the
        records in between never reached the worker. Take it only if they are deleted (the
        log starts past them: retention); else seek the partition back to ``expected`` and
        hold the message back."""
        now = self.clock()
        target = self.rewinds.target(partition, expected, now)
        if target is not None:  # sought already: a record fetched before the seek, held back,
            return offset == target  # or the first from where the log now starts
        consumer = self.app.consumer
        tp = TP(KafkaTopics.READINGS, partition)
        start = (await consumer.earliest_offsets(tp)).get(tp) or 0
        if offset <= start:
            log.warning(
                "%s partition %d: offsets %d..%d were deleted (retention) before the worker read them",
                KafkaTopics.READINGS, partition, expected, offset - 1,
            )  # fmt: skip
            return True
        target = max(expected, start)
        self.rewinds.sought(partition, expected, target, now)
        self.observer.rewound()
        log.warning(
            "%s partition %d: offset %d arrived where %d was expected (offsets %d..%d never reached "
            "the worker); seeking back to %d",
            KafkaTopics.READINGS, partition, offset, expected, expected, offset - 1, target,
        )  # fmt: skip
        try:
            await consumer.seek(tp, target)
        except IllegalStateError:  # revoked meanwhile: its next owner starts from the committed mark
            log.info("%s partition %d is no longer assigned: not sought", KafkaTopics.READINGS, partition)
        return False


def create_app(settings: StreamsSettings) -> faust.App:
    faust_compat.install(bootstrap=settings.kafka_bootstrap, fetch_wait_ms=settings.kafka_fetch_wait_ms)
    app = faust.App(
        settings.streams_app_id,
        broker=[f"kafka://{s.strip()}" for s in settings.kafka_bootstrap.split(",")],
        store="memory://",
        datadir=settings.streams_data_dir,
        topic_partitions=settings.kafka_partitions,
        topic_replication_factor=1,
        broker_session_timeout=settings.kafka_session_timeout_ms / 1000,
        broker_heartbeat_interval=max(0.5, settings.kafka_session_timeout_ms / 6000),
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        # batch the changelog and KPI records (aiokafka sends each record alone at linger 0)
        producer_linger_ms=10,
        producer_max_batch_size=512 * 1024,
        web_enabled=settings.streams_web_port > 0,
        web_port=settings.streams_web_port or 6066,
        table_cleanup_interval=3600,
        # the check guards on-disk (RocksDB) stores against a truncated changelog; ours is in memory.
        # Before faust_compat.true_highwaters, tansu's understated end offsets made it stop a worker that had read
        # a changelog to its real end, which then left the group (docs/broker-behaviours.md)
        recovery_consistency_check=False,
    )
    registry = RegistryFollower(settings.kafka_bootstrap)

    readings = app.topic(
        KafkaTopics.READINGS, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
    )
    kpis = app.topic(KafkaTopics.KPIS, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    late = app.topic(KafkaTopics.LATE, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    # One table for every state (streams.checkpoint): "w|<window>", "d|<device>", "x|<experiment>"
    # and the applied marks "a|<partition>"; raw bytes, written only by ``write_chunk``.
    state = app.Table(
        "pilotlab-state",
        default=None,
        partitions=settings.kafka_partitions,
        key_type=bytes,  # bytes: the "raw" codec
        value_type=bytes,
    )
    horizon_ms, memory = settings.streams_dedup_horizon_s * 1000, settings.streams_dedup_instants
    status = app.topic(
        KafkaTopics.DEVICE_STATUS, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
    )
    observer = StreamsObserver(app, state, registry, settings.kafka_bootstrap)  # streams.metrics

    async def experiment_for(experiment_id: str):
        waited = 0.0
        while (exp := registry.registry.experiments.get(experiment_id)) is None:
            if waited % 10 == 0:
                log.warning("waiting for experiment %r to appear in the registry", experiment_id)
            await asyncio.sleep(0.5)
            waited += 0.5
        return exp

    def stored(key: str) -> bytes | None:
        return state.data.get(key.encode())

    def applied(tp) -> int | None:
        """A readings partition's mark: the offset Faust may commit (faust_compat.commit_applied)."""
        if tp.topic != KafkaTopics.READINGS:
            return None
        return read_mark(stored, tp.partition)

    async def write_chunk(partition: int, out: ChunkOut) -> None:
        """Outputs first, then the state entries, then the mark: each step confirmed by the
        broker before the next (``force``: now, not attached to the chunk's last event)."""
        sends = []
        for exp_id, values in out.kpis.items():
            for value in encode_kpi_records(values):
                sends.append(await kpis.send(key=exp_id.encode(), value=value, force=True))
        for held in out.late:
            log.info("%d late readings of %s routed to %s", len(held.readings), held.device_id, KafkaTopics.LATE)
            sends.append(await late.send(key=held.experiment_id.encode(), value=held.to_json(), force=True))
        for t in out.transitions:
            sends.append(await status.send(key=t.experiment_id.encode(), value=t.to_json(), force=True))
        await asyncio.gather(*sends)
        *entries, (mark, end) = out.writes
        changelog = state.changelog_topic
        sends = [await changelog.send(key=k.encode(), value=v, partition=partition, force=True) for k, v in entries]
        await asyncio.gather(*sends)
        await (await changelog.send(key=mark.encode(), value=end, partition=partition, force=True))
        for k, v in out.writes:
            state.data[k.encode()] = v

    @app.agent(readings)
    async def compute_kpis(stream):
        try:
            await _compute_kpis(stream)
        except Exception:  # noqa: BLE001 - any error: crash-only (see crash_worker)
            crash_worker("the KPI agent failed")

    rewinder = Rewinder(app, observer)

    async def _compute_kpis(stream):
        chunk_max, within = settings.streams_chunk_max, settings.streams_chunk_wait_ms / 1000
        async for events in stream.take_events(chunk_max, within=within):
            by_partition: dict[int, list] = {}
            for event in events:
                by_partition.setdefault(event.message.partition, []).append(event)
            for partition, part in by_partition.items():
                chunk = Chunk(stored, partition)
                admitted = admit(chunk.mark, part, _offset)
                fresh, skipped, gap = admitted.messages, admitted.skipped, admitted.gap
                if fresh:
                    rewinder.rewinds.reached(partition)
                while gap is not None:
                    if not await rewinder.take_past_gap(partition, *gap):
                        observer.held_back(len(admitted.rest))
                        break
                    admitted = admit(gap[1], admitted.rest, _offset)
                    fresh, skipped, gap = fresh + admitted.messages, skipped + admitted.skipped, admitted.gap
                observer.skipped(skipped)
                if not fresh:
                    continue
                with collector_paused():  # decoding and computing: see collector_paused
                    decoded = [(event.message.offset, ReadingBatch.all_from_json(event.value)) for event in fresh]
                messages = [
                    (offset, batch, await experiment_for(batch.experiment_id))
                    for offset, batches in decoded
                    for batch in batches
                ]
                started = time.perf_counter()
                with collector_paused():
                    out = run_chunk(chunk, messages, horizon_ms=horizon_ms, memory=memory)
                computed = time.perf_counter()
                await write_chunk(partition, out)
                observer.chunk(messages, out, computed - started, time.perf_counter() - computed)

    @app.on_partitions_assigned.connect
    async def log_assignment(app, assigned, **_kw) -> None:
        mine = sorted(tp.partition for tp in assigned if tp.topic == KafkaTopics.READINGS)
        log.info("assigned %s partitions: %s", KafkaTopics.READINGS, mine)
        rewinder.rewinds.forget()

    @app.on_rebalance_complete.connect
    async def state_recovered(app, **_kw) -> None:
        """The table holds this generation's partitions: their marks may be compared with the
        committed offsets (faust_compat.rewind_uncommitted)."""
        app.pilotlab_state_generation = app.consumer_generation_id

    app.pilotlab_applied = applied  # read by faust_compat.commit_applied
    app.pilotlab_registry = registry  # for tests
    app.pilotlab_observer = observer
    return app


def main(settings: StreamsSettings) -> None:
    from faust.worker import Worker  # noqa: PLC0415 - only the worker process needs it

    Path(settings.streams_data_dir).mkdir(parents=True, exist_ok=True)
    app = create_app(settings)
    observer = app.pilotlab_observer
    observer.serve(settings.streams_metrics_port)  # /metrics, /healthz, /readyz and the lag thread
    # know every registered experiment before the first reading arrives (a daemon thread)
    app.pilotlab_registry.start()
    for _ in range(60):
        if app.pilotlab_registry.ready.wait(1):
            break
        observer.health.beat()  # waiting for Kafka is alive, not ready
    else:
        raise SystemExit(f"could not read the registry topic at {settings.kafka_bootstrap}")
    # what start-up made (modules, the app, its topics and table, the registry) lives as long as
    # the process: out of the cycle collector's view, so full collections do not walk it again
    # and again (as ingest does; chunks pause the collector themselves, checkpoint.collector_paused)
    gc.freeze()
    Worker(app, observer.service(), loglevel="INFO", quiet=True).execute_from_commandline()
