"""The Faust worker: thin agents around the pure KPI engine.

``compute_kpis`` decodes a reading batch, finds its experiment in the registry, folds the
batch into the window table (``streams.engine``), and emits the updated KPIs. Window states
live in a Faust table whose changelog restores them after a crash. Faust is at-least-once
(tansu has no transactions), so the table also records, per source partition, the next
offset to apply: a message replayed after recovery is recognised and skipped, so nothing is
counted twice. Readings delivered twice (an MQTT redelivery after an ingest crash) are
screened out per device on the same natural key storage uses (device, metric, ts).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import faust

from pilotlab.contracts import KafkaTopics, ReadingBatch, encode_kpis
from pilotlab.registry import RegistryFollower
from pilotlab.settings import StreamsSettings
from streams.engine import advance, apply_batch, screen, split_late

log = logging.getLogger("pilotlab.streams")


def create_app(settings: StreamsSettings) -> faust.App:
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
    windows = app.Table("kpi-windows", default=None, partitions=settings.kafka_partitions)
    seen = app.Table("device-seen", default=None, partitions=settings.kafka_partitions)
    horizon_ms = settings.streams_dedup_horizon_s * 1000
    applied = app.Table("applied-offsets", default=None, partitions=settings.kafka_partitions)
    # per experiment: its event-time watermark and each device's last reading and status
    clocks = app.Table("experiment-clock", default=None, partitions=settings.kafka_partitions)
    status = app.topic(
        KafkaTopics.DEVICE_STATUS, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
    )

    async def experiment_for(experiment_id: str):
        waited = 0.0
        while (exp := registry.registry.experiments.get(experiment_id)) is None:
            if waited % 10 == 0:
                log.warning("waiting for experiment %r to appear in the registry", experiment_id)
            await asyncio.sleep(0.5)
            waited += 0.5
        return exp

    @app.agent(readings)
    async def compute_kpis(stream):
        async for event in stream.events():
            partition, offset = event.message.partition, event.message.offset
            mark = f"{KafkaTopics.READINGS}:{partition}"
            done = applied.get(mark)
            if done is not None and offset < done:
                continue  # applied before a crash; its effect is already in the table
            batch = ReadingBatch.from_json(event.value)
            experiment = await experiment_for(batch.experiment_id)
            screened, seen[batch.device_id] = screen(batch, seen.get(batch.device_id), horizon_ms)
            before = clocks.get(batch.experiment_id)
            on_time, past_lateness = split_late(screened.fresh, experiment, before and before["wm"])
            updates = apply_batch(on_time, experiment, windows.get, windows.__setitem__)
            clocks[batch.experiment_id], transitions = advance(before, screened.fresh, experiment)
            applied[mark] = offset + 1
            key = batch.experiment_id.encode()
            if updates:
                await kpis.send(key=key, value=encode_kpis(updates))
            if screened.too_late or past_lateness:
                held = ReadingBatch(
                    batch.experiment_id,
                    batch.device_id,
                    batch.group,
                    batch.received_ms,
                    (*screened.too_late, *past_lateness),
                )
                log.info("%d late readings of %s routed to %s", len(held.readings), batch.device_id, KafkaTopics.LATE)
                await late.send(key=key, value=held.to_json())
            for t in transitions:
                await status.send(key=key, value=t.to_json())

    app.pilotlab_registry = registry  # for tests
    return app


def main(settings: StreamsSettings) -> None:
    from faust.worker import Worker  # noqa: PLC0415 - only the worker process needs it

    Path(settings.streams_data_dir).mkdir(parents=True, exist_ok=True)
    app = create_app(settings)
    # know every registered experiment before the first reading arrives (a daemon thread)
    app.pilotlab_registry.start()
    if not app.pilotlab_registry.ready.wait(60):
        raise SystemExit(f"could not read the registry topic at {settings.kafka_bootstrap}")
    Worker(app, loglevel="INFO", quiet=True).execute_from_commandline()
