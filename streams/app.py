"""The Faust worker: a thin agent around the pure KPI engine (``streams.engine.process``).

``compute_kpis`` decodes a reading batch, finds its experiment in the registry, runs it
through the engine (de-duplication, allowed lateness, event-time windows, liveness) and sends
the updated KPIs (``pilotlab.kpis``), late readings (``pilotlab.late``) and device status
changes (``pilotlab.device-status``), all keyed by experiment. Every state lives in ONE Faust
table, so that the writes a message causes reach one changelog partition in order; the
applied-offset mark is the last of them. Faust is at-least-once (tansu has no transactions):
after a crash a replayed message finds which of its writes survived and neither counts
twice nor loses anything (see ``process``). Readings delivered twice (an MQTT redelivery) are
screened out per device on the natural key storage uses (device, metric, ts).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import faust

from pilotlab.contracts import KafkaTopics, ReadingBatch, encode_kpis
from pilotlab.registry import RegistryFollower
from pilotlab.settings import StreamsSettings
from streams.engine import process

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
    # One table for every state, so that the writes of one message go to one changelog
    # partition in order (see streams.engine.process): "w|<window>", "d|<device>",
    # "x|<experiment>" (watermark, liveness), "a|<partition>" (applied offsets).
    state = app.Table("pilotlab-state", default=None, partitions=settings.kafka_partitions)
    horizon_ms = settings.streams_dedup_horizon_s * 1000
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
            source = [event.message.partition, event.message.offset]
            batch = ReadingBatch.from_json(event.value)
            experiment = await experiment_for(batch.experiment_id)
            out = process(batch, experiment, state.get, state.__setitem__, source=source, horizon_ms=horizon_ms)
            key = batch.experiment_id.encode()
            if out.kpis:
                await kpis.send(key=key, value=encode_kpis(out.kpis))
            if out.late:
                held = ReadingBatch(batch.experiment_id, batch.device_id, batch.group, batch.received_ms, out.late)
                log.info("%d late readings of %s routed to %s", len(out.late), batch.device_id, KafkaTopics.LATE)
                await late.send(key=key, value=held.to_json())
            for t in out.transitions:
                await status.send(key=key, value=t.to_json())

    @app.on_partitions_assigned.connect
    async def log_assignment(app, assigned, **_kw) -> None:
        mine = sorted(tp.partition for tp in assigned if tp.topic == KafkaTopics.READINGS)
        log.info("assigned %s partitions: %s", KafkaTopics.READINGS, mine)

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
