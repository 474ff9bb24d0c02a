"""The Faust agent with Faust's ``test_context``: no broker; the topics the agent writes to
are replaced by a recorder (the only fake), its tables are the app's real in-memory tables."""

from __future__ import annotations

import asyncio
from pathlib import Path
from unittest import mock

import faust
import orjson

from pilotlab.contracts import DeviceStatus, KafkaTopics, Reading, ReadingBatch, decode_kpis
from pilotlab.registry import Registry
from pilotlab.settings import StreamsSettings
from streams.app import create_app
from tests.unit.test_streams_engine import EXP, MIN, T0, batch

PAUSE = None  # in run_agent's messages: let the agent take what it was given as a chunk first


def run_agent(tmp_path: Path, messages: list[tuple[int | None, ReadingBatch] | None]) -> tuple[list, faust.App]:
    """Feed (offset or None for the next one, batch) to the agent; return what it sent."""
    settings = StreamsSettings(kafka_bootstrap="127.0.0.1:1", streams_data_dir=str(tmp_path), streams_chunk_wait_ms=5)
    app = create_app(settings)
    app.pilotlab_registry.registry = Registry.of([EXP])
    agent = app.agents["streams.app.compute_kpis"]
    sent: list[tuple[str, bytes, bytes]] = []

    async def record(self, *, key=None, value=None, **_kw):
        sent.append((self.get_topic_name(), key, value))
        delivered = asyncio.get_running_loop().create_future()
        delivered.set_result(None)
        return delivered

    async def go() -> None:
        with mock.patch.object(faust.topics.Topic, "send", record):
            async with agent.test_context() as a:
                for item in messages:
                    if item is PAUSE:
                        await asyncio.sleep(0.2)
                        continue
                    offset, b = item
                    if offset is not None:
                        a.sent_offset = offset  # a redelivery after a crash
                    await a.put(b.to_json(), key=b.experiment_id.encode())

    asyncio.run(go())
    return sent, app


def on(sent, topic):
    return [(k, v) for t, k, v in sent if t == topic]


def test_a_chunk_emits_the_latest_kpis_of_the_windows_it_changed_keyed_by_experiment(tmp_path: Path) -> None:
    sent, _ = run_agent(
        tmp_path,
        [
            (None, batch("t1", [Reading(1, T0, {"pm25": 3.0})])),
            (None, batch("t1", [Reading(2, T0 + 1000, {"pm25": 5.0})])),
        ],
    )
    kpi_msgs = on(sent, KafkaTopics.KPIS)
    assert {k for k, _ in kpi_msgs} == {b"ev"}
    latest = {}
    for _, v in kpi_msgs:  # one chunk or two, depending on timing: the last value counts
        latest.update({(x.kpi, x.window_start_ms): x for x in decode_kpis(v)})
    mean = latest[("pm_mean", T0)]
    assert (mean.value, mean.sample_count, mean.revision) == (4.0, 2, 2)  # one revision per message
    assert {v.kind for v in latest.values()} == {
        "mean",
        "quantile",
        "exceedance",
        "availability",
        "completeness",
        "freshness",
        "impact",
    }


def test_a_replayed_offset_and_a_duplicate_delivery_count_nothing(tmp_path: Path) -> None:
    b1 = batch("t1", [Reading(1, T0, {"pm25": 3.0})])
    b2 = batch("t1", [Reading(2, T0 + 1000, {"pm25": 5.0})])
    sent, app = run_agent(tmp_path, [(None, b1), (None, b2), (1, b2), (None, b2)])
    # offset 1 again (below the applied mark): skipped; offset 2 (the same readings in a new
    # message): screened as duplicates, no KPI changes, nothing sent
    kpi_msgs = [decode_kpis(v) for _, v in on(sent, KafkaTopics.KPIS)]
    assert next(v for v in kpi_msgs[-1] if v.kpi == "pm_mean").sample_count == 2
    assert app.tables["pilotlab-state"].data[b"a|0"] == b"3"
    changelog = [k for t, k, _ in sent if t.endswith("pilotlab-state-changelog")]
    assert changelog[-1] == b"a|0"  # the mark is written last


def test_readings_past_lateness_go_to_the_late_topic(tmp_path: Path) -> None:
    late = Reading(3, T0 + 10_000, {"pm25": 99.0})
    sent, _ = run_agent(
        tmp_path,
        [
            (None, batch("t1", [Reading(1, T0, {"pm25": 3.0})])),
            (None, batch("t2", [Reading(2, T0 + 30 * MIN, {"pm25": 5.0})])),
            (None, batch("t1", [late])),
        ],
    )
    ((key, value),) = on(sent, KafkaTopics.LATE)
    assert key == b"ev"
    assert ReadingBatch.from_json(value).readings == (late,)


def test_silence_and_return_emit_device_status(tmp_path: Path) -> None:
    sent, _ = run_agent(
        tmp_path,
        [
            (None, batch("t1", [Reading(1, T0, {"pm25": 3.0})])),
            (None, batch("t2", [Reading(1, T0 + 4 * MIN, {"pm25": 3.0})])),  # t1 silent 4 > 3 intervals
            (None, batch("t1", [Reading(2, T0 + 5 * MIN, {"pm25": 3.0})])),
        ],
    )
    events = [DeviceStatus.from_json(v) for _, v in on(sent, KafkaTopics.DEVICE_STATUS)]
    assert [(e.device_id, e.status, e.ts_ms) for e in events] == [
        ("t1", "online", T0),  # first reports
        ("t2", "online", T0 + 4 * MIN),
        ("t1", "offline", T0 + 3 * MIN),
        ("t1", "online", T0 + 5 * MIN),
    ]
    assert all(orjson.loads(v)["experiment_id"] == "ev" for _, v in on(sent, KafkaTopics.DEVICE_STATUS))


def test_messages_past_a_gap_in_the_offsets_are_held_back_and_the_partition_sought_back(tmp_path: Path) -> None:
    """Offsets 2..4 never reach the agent (a record fetched before a seek arriving first, or a
    consumer position ahead of the state): offset 5 is held back, not applied past the gap,
    and the partition is sought back to 2; once 2..5 come, every reading counts once."""
    readings = [batch("t1", [Reading(o, T0 + o * 1000, {"pm25": float(o)})]) for o in range(6)]
    seeks: list[tuple[int, int]] = []

    async def earliest_offsets(self, *tps):  # the log starts at 0: nothing deleted
        return dict.fromkeys(tps, 0)

    async def seek(self, tp, offset):
        seeks.append((tp.partition, offset))

    with (
        mock.patch.object(faust.transport.consumer.ThreadDelegateConsumer, "earliest_offsets", earliest_offsets),
        mock.patch.object(faust.transport.consumer.Consumer, "seek", seek),
    ):
        sent, app = run_agent(
            tmp_path,
            [
                (None, readings[0]),
                (None, readings[1]),
                (5, readings[5]),
                PAUSE,
                (2, readings[2]),
                *[(None, b) for b in readings[3:]],
            ],
        )
    assert seeks == [(0, 2)]
    counts = [next(v for v in decode_kpis(v) if v.kpi == "pm_mean").sample_count for _, v in on(sent, KafkaTopics.KPIS)]
    assert counts[-1] == 6  # every reading once: 5 held back, then taken after 2..4
    assert app.tables["pilotlab-state"].data[b"a|0"] == b"6"
