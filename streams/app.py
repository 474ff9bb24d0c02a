"""The Faust worker: a thin agent around the pure KPI engine (``streams.engine``).

``compute_kpis`` takes reading batches in chunks (``take_events``); per partition it decodes
them, finds each experiment in the registry and runs them through the engine on a working
copy of the state (``streams.checkpoint.run_chunk``: de-duplication, allowed lateness,
event-time windows, liveness). Then it sends the chunk's latest KPIs (``pilotlab.kpis``),
late readings (``pilotlab.late``) and device status changes (``pilotlab.device-status``),
keyed by experiment, waits for the broker, and writes each changed state key once to the
table's changelog with the partition's applied mark last. Offsets are committed after that
(Faust acks a chunk's events when the loop body returns). tansu has no transactions, so a
crash is made safe by ``streams.checkpoint``: the state rolls back to the mark and the
messages after it are replayed, neither counted twice nor lost.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from pathlib import Path

import faust
from faust.tables.recovery import Recovery
from faust.transport.consumer import Consumer as FaustConsumer
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

from pilotlab.contracts import KafkaTopics, ReadingBatch, encode_kpis
from pilotlab.kafka_admin import end_offsets
from pilotlab.registry import RegistryFollower
from pilotlab.settings import StreamsSettings
from streams.checkpoint import Chunk, ChunkOut, run_chunk
from streams.metrics import StreamsObserver

log = logging.getLogger("pilotlab.streams")


def limit_fetch_wait(ms: int) -> None:
    """Faust creates its aiokafka consumer with ``fetch_max_wait_ms=1500`` and offers no
    setting for it; tansu answers a fetch only when that wait runs out, so every quiet
    moment would cost up to 1.5 s of latency. Set the worker's own value instead."""
    create = AIOKafkaConsumerThread.__dict__["_create_worker_consumer"]
    create = getattr(create, "__wrapped__", create)

    @functools.wraps(create)
    def _create_worker_consumer(self, transport):
        consumer = create(self, transport)
        consumer._fetch_max_wait_ms = ms  # read when the consumer starts its fetcher
        return consumer

    AIOKafkaConsumerThread._create_worker_consumer = _create_worker_consumer


def true_highwaters(bootstrap: str) -> None:
    """Faust's recovery reads a changelog partition up to its high watermark from ListOffsets,
    which tansu 0.6.0 understates: the last record batch's base offset + 1. A partition taken
    over from another worker was recovered without the rest of that batch (state entries of a
    chunk whose mark was not written yet, which read as rolled back either way; the mark is
    sent alone), left for a later recovery to read. Take the end offsets a fetch reports
    (``end_offsets``; on Apache Kafka the same values), so recovery reads what is there."""
    highwaters = AIOKafkaConsumerThread.__dict__["_highwaters"]
    highwaters = getattr(highwaters, "__wrapped__", highwaters)

    @functools.wraps(highwaters)
    async def _highwaters(self, partitions):
        reported = dict(await highwaters(self, partitions))
        if self.consumer.in_transaction or not reported:
            return reported
        ends = await asyncio.to_thread(end_offsets, bootstrap, [(tp.topic, tp.partition) for tp in reported])
        return {tp: max(value or 0, ends[(tp.topic, tp.partition)]) for tp, value in reported.items()}

    AIOKafkaConsumerThread._highwaters = _highwaters


def rewind_uncommitted() -> None:
    """When a rebalance starts (or flow stops) Faust drops the records it fetched but had not
    handed to a stream yet and seeks back to the committed offsets to fetch them again
    (``Consumer.perform_seek``). aiokafka's ``seek_to_committed`` skips a partition without a
    committed offset (none, or 0): it stays where the fetcher stood, and the dropped records of
    a partition the group never committed were skipped for good (a whole partition of
    readings, in the two-worker kill test). Seek those stream partitions to their start."""
    perform_seek = FaustConsumer.__dict__["perform_seek"]
    perform_seek = getattr(perform_seek, "__wrapped__", perform_seek)

    @functools.wraps(perform_seek)
    async def _perform_seek(self) -> None:
        await perform_seek(self)
        changelogs = self.app.tables.changelog_topics
        for tp in self.assignment():
            if tp.topic not in changelogs and not self._committed_offset.get(tp):
                await self.seek(tp, 0)  # before the log start: aiokafka resets to the earliest

    FaustConsumer.perform_seek = _perform_seek


def commit_contiguous() -> None:
    """Faust commits the end of the first run of consecutive acked offsets, after filling in
    the "gaps" it saw in the offsets it read (for compacted or transactional topics; ours
    have neither). After a seek back (a rebalance), a message read before the seek arrives
    after it and looks like a jump: its gap was filled on top of the redelivered offsets, the
    acked list held duplicates and the committed offset crawled one offset per commit (a
    partition's lag stuck for minutes). Faust also commits past the committed offset when only
    that message is missing. Commit the acked run that starts at the committed offset, only."""

    async def _add_gap(self, tp, offset_from: int, offset_to: int) -> None:
        return None

    def _new_offset(self, tp):
        acked = self._acked[tp]
        if not acked:
            return None
        committed = self._committed_offset[tp]
        offsets = sorted({o for o in acked if committed is None or o >= committed})
        end = offsets[0] if offsets and committed is None else committed
        for offset in offsets:
            if offset != end:
                break
            end += 1
        acked[:] = [o for o in offsets if o >= end]
        index = self._acked_index[tp]
        index.difference_update([o for o in index if o < end])
        return end if offsets and end != committed else None

    FaustConsumer._add_gap = _add_gap
    FaustConsumer._new_offset = _new_offset


class _NoReadOffsets(dict):
    """Faust's read offsets, kept but never consulted (see ``read_every_delivery``)."""

    def __getitem__(self, tp):
        return None


def read_every_delivery() -> None:
    """Faust's fetch loop drops a record below the last offset it read from that partition.
    After a seek back (a rebalance) a record read before the seek can still arrive after it
    and raise that mark, so the records the seek fetches again were dropped, unacked: a
    partition stopped committing (lag stuck). Let every delivery through: the stream skips
    the records of an older generation itself, and the chunk skips offsets already applied."""
    drain = FaustConsumer.__dict__["_drain_messages"]
    drain = getattr(drain, "__wrapped__", drain)

    @functools.wraps(drain)
    async def _drain_messages(self, fetcher) -> None:
        self._read_offset = _NoReadOffsets()
        await drain(self, fetcher)

    FaustConsumer._drain_messages = _drain_messages


def keep_kept_partitions() -> None:
    """Faust's in-memory store has no persisted offsets: at every rebalance, recovery reads a
    changelog partition the worker keeps from the last offset *recovery* read, i.e. replays
    the worker's own writes since over its table while the last chunk may still complete. A
    chunk's state could be rolled back under its own mark and committed offsets (readings
    missing from the KPIs, in the two-worker kill test). The table of a partition the worker
    held as active through the previous recovery is current (its writes are confirmed before
    the table is), so recovery starts such partitions at their high watermark."""
    rebalance = Recovery.__dict__["on_rebalance"]
    rebalance = getattr(rebalance, "__wrapped__", rebalance)
    build_offsets = Recovery.__dict__["_build_offsets"]
    build_offsets = getattr(build_offsets, "__wrapped__", build_offsets)
    completed = Recovery.__dict__["on_recovery_completed"]
    completed = getattr(completed, "__wrapped__", completed)

    @functools.wraps(completed)
    async def on_recovery_completed(self, generation_id: int = 0) -> None:
        await completed(self, generation_id)
        self.__dict__["_pilotlab_recovered"] = set(self.active_tps)

    @functools.wraps(rebalance)
    async def on_rebalance(self, assigned, revoked, newly_assigned, generation_id: int = 0) -> None:
        # held through the recovery that completed right before this rebalance, not through
        # an interrupted one (another worker may have had the partition meanwhile)
        held = set(self.__dict__.get("_pilotlab_recovered", ()))
        self.__dict__["_pilotlab_recovered"] = set()
        self.__dict__["_pilotlab_kept"] = set()
        await rebalance(self, assigned, revoked, newly_assigned, generation_id)
        self.__dict__["_pilotlab_kept"] = held & set(self.active_tps)

    @functools.wraps(build_offsets)
    async def _build_offsets(self, consumer, tps, destination, title: str) -> None:
        await build_offsets(self, consumer, tps, destination, title)
        if title == "active":
            for tp in set(tps) & self.__dict__.get("_pilotlab_kept", set()):
                highwater = self.active_highwaters.get(tp)
                if highwater is not None and (destination[tp] is None or destination[tp] < highwater):
                    destination[tp] = highwater

    Recovery.on_rebalance = on_rebalance
    Recovery._build_offsets = _build_offsets
    Recovery.on_recovery_completed = on_recovery_completed


def crash_worker(what: str) -> None:
    """Crash-only: end the worker process on an error the agent cannot handle. Faust would
    restart the agent inside the live worker, past the chunk that failed: its messages never
    applied nor acked (KPIs short, lag stuck). A new worker (``pilotlab run streams``
    supervises it) rolls the state back to its mark and replays from the committed offsets."""
    log.exception("%s; ending the worker so that it restarts from its last mark", what)
    logging.shutdown()
    os._exit(70)


def create_app(settings: StreamsSettings) -> faust.App:
    limit_fetch_wait(settings.kafka_fetch_wait_ms)
    true_highwaters(settings.kafka_bootstrap)
    keep_kept_partitions()
    rewind_uncommitted()
    commit_contiguous()
    read_every_delivery()
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
        # Before true_highwaters, tansu's understated end offsets made it stop a worker that had read
        # a changelog to its real end, which then left the group (README, Workers dying and rejoining)
        recovery_consistency_check=False,
    )
    registry = RegistryFollower(settings.kafka_bootstrap)

    readings = app.topic(
        KafkaTopics.READINGS, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
    )
    kpis = app.topic(
        KafkaTopics.KPIS, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
    )
    late = app.topic(
        KafkaTopics.LATE, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
    )
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

    async def write_chunk(partition: int, out: ChunkOut) -> None:
        """Outputs first, then the state entries, then the mark: each step confirmed by the
        broker before the next (``force``: now, not attached to the chunk's last event)."""
        sends = []
        for exp_id, values in out.kpis.items():
            sends.append(await kpis.send(key=exp_id.encode(), value=encode_kpis(values), force=True))
        for held in out.late:
            log.info("%d late readings of %s routed to %s", len(held.readings), held.device_id, KafkaTopics.LATE)
            sends.append(await late.send(key=held.experiment_id.encode(), value=held.to_json(), force=True))
        for t in out.transitions:
            sends.append(await status.send(key=t.experiment_id.encode(), value=t.to_json(), force=True))
        await asyncio.gather(*sends)
        *entries, (mark, end) = out.writes
        changelog = state.changelog_topic
        sends = [
            await changelog.send(key=k.encode(), value=v, partition=partition, force=True) for k, v in entries
        ]
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

    async def _compute_kpis(stream):
        chunk_max, within = settings.streams_chunk_max, settings.streams_chunk_wait_ms / 1000
        async for events in stream.take_events(chunk_max, within=within):
            by_partition: dict[int, list] = {}
            for event in events:
                by_partition.setdefault(event.message.partition, []).append(event)
            for partition, part in by_partition.items():
                chunk = Chunk(stored, partition)
                messages = []
                for event in part:
                    if chunk.applied(event.message.offset):
                        continue
                    batch = ReadingBatch.from_json(event.value)
                    messages.append((event.message.offset, batch, await experiment_for(batch.experiment_id)))
                if messages:
                    started = time.perf_counter()
                    out = run_chunk(chunk, messages, horizon_ms=horizon_ms, memory=memory)
                    computed = time.perf_counter()
                    await write_chunk(partition, out)
                    observer.chunk(messages, out, computed - started, time.perf_counter() - computed)
                observer.skipped(len(part) - len(messages))

    @app.on_partitions_assigned.connect
    async def log_assignment(app, assigned, **_kw) -> None:
        mine = sorted(tp.partition for tp in assigned if tp.topic == KafkaTopics.READINGS)
        log.info("assigned %s partitions: %s", KafkaTopics.READINGS, mine)

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
    Worker(app, observer.service(), loglevel="INFO", quiet=True).execute_from_commandline()
