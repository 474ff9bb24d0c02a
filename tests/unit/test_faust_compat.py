"""Each workaround in ``streams.faust_compat``, installed the way the worker installs it
(``streams.app.create_app``), against the pinned faust-streaming/aiokafka classes. Each test
shows what the library does on its own (``__wrapped__``) and what the worker gets: removing a
patch from ``faust_compat.install`` fails its test here."""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from types import SimpleNamespace

import pytest
from faust.tables.recovery import Recovery
from faust.transport.consumer import Consumer as FaustConsumer
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.types import TP
from intervaltree import IntervalTree

from pilotlab.contracts import KafkaTopics
from pilotlab.settings import StreamsSettings
from streams import faust_compat
from streams.app import create_app
from streams.checkpoint import mark_key

READINGS = TP(KafkaTopics.READINGS, 1)
OTHER = TP("some-acked-topic", 0)
CHANGELOG = TP("pilotlab-streams-pilotlab-state-changelog", 1)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    settings = StreamsSettings(
        kafka_bootstrap="127.0.0.1:1",
        streams_data_dir=str(tmp_path_factory.mktemp("streams")),
        kafka_fetch_wait_ms=123,
    )
    return create_app(settings)


def consumer(app, acked: dict, committed: dict, assigned=(READINGS, OTHER)):
    return SimpleNamespace(
        app=app,
        _acked=defaultdict(list, {tp: list(v) for tp, v in acked.items()}),
        _acked_index=defaultdict(set, {tp: set(v) for tp, v in acked.items()}),
        _committed_offset=defaultdict(lambda: None, committed),
        _gap=defaultdict(IntervalTree),
        assignment=lambda: set(assigned),
    )


def set_mark(app, partition: int, mark: int | None) -> None:
    key = mark_key(partition).encode()
    app.tables["pilotlab-state"].data.pop(key, None)
    if mark is not None:
        app.tables["pilotlab-state"].data[key] = str(mark).encode()


# --- commit_applied ------------------------------------------------------------------------------


def test_a_skipped_message_faust_acked_is_not_committed_before_the_state_applied_it(app) -> None:
    """Offsets 10..12 acked, but the worker's state applied only 10 (11 and 12 were skipped
    by the stream during a rebalance, and acked by Faust)."""
    set_mark(app, 1, 11)
    original = FaustConsumer._new_offset.__wrapped__
    assert original(consumer(app, {READINGS: [10, 11, 12]}, {READINGS: 10}), READINGS) == 13  # the loss
    assert FaustConsumer._new_offset(consumer(app, {READINGS: [10, 11, 12]}, {READINGS: 10}), READINGS) == 11


def test_the_mark_is_committed_once_and_only_for_an_assigned_partition(app) -> None:
    set_mark(app, 1, 40)
    c = consumer(app, {READINGS: [38, 39]}, {READINGS: 30})
    assert FaustConsumer._new_offset(c, READINGS) == 40
    assert c._acked[READINGS] == [] and c._acked_index[READINGS] == set()  # below the mark: done
    assert FaustConsumer._new_offset(consumer(app, {READINGS: [39]}, {READINGS: 40}), READINGS) is None
    revoked = consumer(app, {READINGS: [38, 39]}, {READINGS: 30}, assigned=())
    assert FaustConsumer._new_offset(revoked, READINGS) is None
    set_mark(app, 1, None)  # nothing applied yet: nothing to commit
    assert FaustConsumer._new_offset(consumer(app, {READINGS: [0, 1]}, {}), READINGS) is None


def test_another_topic_commits_only_the_acked_run_from_the_committed_offset(app) -> None:
    original = FaustConsumer._new_offset.__wrapped__
    # the message at the committed offset (5) is missing: Faust commits past it
    assert original(consumer(app, {OTHER: [6, 7]}, {OTHER: 5}), OTHER) == 8
    assert FaustConsumer._new_offset(consumer(app, {OTHER: [6, 7]}, {OTHER: 5}), OTHER) is None
    assert FaustConsumer._new_offset(consumer(app, {OTHER: [5, 6, 8]}, {OTHER: 5}), OTHER) == 7
    # a redelivered run after a seek back holds duplicates: counted once
    assert FaustConsumer._new_offset(consumer(app, {OTHER: [5, 5, 6, 6, 7]}, {OTHER: 5}), OTHER) == 8


# --- rewind_uncommitted --------------------------------------------------------------------------


def test_a_stream_partition_without_a_committed_offset_is_sought_to_its_start(app) -> None:
    seeks: list = []

    async def seek_to_committed():  # aiokafka: None where the group never committed
        return {READINGS: None, CHANGELOG: None, OTHER: 7}

    async def seek(tp, offset):
        seeks.append((tp, offset))

    def fresh():
        return SimpleNamespace(
            app=SimpleNamespace(tables=SimpleNamespace(changelog_topics={CHANGELOG.topic})),
            _read_offset={},
            _committed_offset={},
            seek_to_committed=seek_to_committed,
            seek=seek,
            assignment=lambda: {READINGS, CHANGELOG, OTHER},
        )

    asyncio.run(FaustConsumer.perform_seek.__wrapped__(fresh()))
    assert seeks == []  # aiokafka left READINGS where its fetcher stood
    asyncio.run(FaustConsumer.perform_seek(fresh()))
    assert seeks == [(READINGS, 0)]


def test_a_stream_partition_committed_past_its_state_is_sought_back_to_the_mark(app) -> None:
    """The commit is the mark (commit_applied), so a committed offset ahead of the recovered
    mark means the state was recovered short: from the committed offset the readings in
    between would reach no chunk."""
    seeks: list = []

    async def seek_to_committed():
        return {READINGS: 40, CHANGELOG: 9}

    async def seek(tp, offset):
        seeks.append((tp, offset))

    def fresh():
        return SimpleNamespace(
            app=app, _read_offset={}, _committed_offset={}, seek_to_committed=seek_to_committed,
            seek=seek, assignment=lambda: {READINGS, CHANGELOG},
        )  # fmt: skip

    set_mark(app, READINGS.partition, 25)
    try:
        asyncio.run(FaustConsumer.perform_seek.__wrapped__(fresh()))
        assert seeks == []  # Faust: from 40 on, 25..39 never applied
        app.pilotlab_state_generation = None  # mid-rebalance, before this generation's recovery
        asyncio.run(FaustConsumer.perform_seek(fresh()))
        assert seeks == []  # the table may still be read: not compared yet
        app.pilotlab_state_generation = app.consumer_generation_id  # recovery completed
        asyncio.run(FaustConsumer.perform_seek(fresh()))
        assert seeks == [(READINGS, 25)]
        seeks.clear()
        set_mark(app, READINGS.partition, 40)
        asyncio.run(FaustConsumer.perform_seek(fresh()))
        assert seeks == []  # the state holds what was committed: stay
    finally:
        set_mark(app, READINGS.partition, None)
        app.pilotlab_state_generation = None


# --- read_every_delivery -------------------------------------------------------------------------


def test_the_fetch_loop_reads_no_mark_of_what_it_read_before(app) -> None:
    seen = {}

    async def drain(self, fetcher):  # what Faust's loop consults: the last offset read per partition
        seen["read"] = self._read_offset[READINGS]

    c = SimpleNamespace(_read_offset={READINGS: 99})
    asyncio.run(drain(c, None))
    assert seen["read"] == 99  # Faust would drop a redelivered record below 99
    assert FaustConsumer._drain_messages.__wrapped__ is not FaustConsumer._drain_messages  # installed
    original = FaustConsumer._drain_messages.__wrapped__
    try:
        FaustConsumer._drain_messages = drain  # the library's loop, stood in by `drain`
        faust_compat.read_every_delivery()
        asyncio.run(FaustConsumer._drain_messages(c, None))
    finally:
        FaustConsumer._drain_messages = original
        faust_compat.read_every_delivery()
    assert seen["read"] is None


# --- keep_kept_partitions ------------------------------------------------------------------------


def test_recovery_starts_a_kept_partition_at_its_high_watermark(app) -> None:
    async def earliest_offsets(*tps):
        return dict.fromkeys(tps, 0)

    recovery = SimpleNamespace(
        active_highwaters={CHANGELOG: 50}, log=SimpleNamespace(info=lambda *a, **k: None), _pilotlab_kept={CHANGELOG}
    )
    recovery._start_offsets_logtable = lambda *a, **k: ""
    kafka = SimpleNamespace(earliest_offsets=earliest_offsets)
    alone: Counter = Counter({CHANGELOG: 10})
    asyncio.run(Recovery._build_offsets.__wrapped__(recovery, kafka, {CHANGELOG}, alone, "active"))
    assert alone[CHANGELOG] == 10  # Faust replays the worker's own writes since offset 10
    patched: Counter = Counter({CHANGELOG: 10})
    asyncio.run(Recovery._build_offsets(recovery, kafka, {CHANGELOG}, patched, "active"))
    assert patched[CHANGELOG] == 50


# --- true_highwaters -----------------------------------------------------------------------------


def test_recovery_reads_to_the_end_a_fetch_reports(app, monkeypatch) -> None:
    async def understated(partitions):
        return dict.fromkeys(partitions, 2)  # tansu: the last batch's base offset + 1

    thread = SimpleNamespace(
        consumer=SimpleNamespace(in_transaction=False),
        _ensure_consumer=lambda: SimpleNamespace(end_offsets=understated),
    )
    monkeypatch.setattr(faust_compat, "end_offsets", lambda bootstrap, tps: dict.fromkeys(tps, 4))
    assert asyncio.run(AIOKafkaConsumerThread._highwaters.__wrapped__(thread, [CHANGELOG])) == {CHANGELOG: 2}
    assert asyncio.run(AIOKafkaConsumerThread._highwaters(thread, [CHANGELOG])) == {CHANGELOG: 4}


# --- limit_fetch_wait ----------------------------------------------------------------------------


def test_the_worker_consumer_waits_as_long_as_its_settings_say(app) -> None:
    async def create():  # aiokafka creates its consumer inside a running loop
        return app.consumer._thread._create_worker_consumer(app.transport)

    assert asyncio.run(create())._fetch_max_wait_ms == 123  # Faust's own: 1500


def test_install_is_idempotent(app) -> None:
    before = FaustConsumer._new_offset
    faust_compat.install(bootstrap="127.0.0.1:1", fetch_wait_ms=123)
    assert FaustConsumer._new_offset is not before
    assert FaustConsumer._new_offset.__wrapped__ is before.__wrapped__  # wraps the library, not itself
