"""Where the streams worker departs from faust-streaming 0.15.3 and aiokafka 0.14.0: every
patch in one place, each naming the behaviour it works around and the test that fails
without it (tests/unit/test_faust_compat.py). Both libraries are pinned in pyproject.toml
because these functions reach into their internals; an upgrade must re-run those tests.

The rest of the worker (``streams.app``) uses Faust as intended: one agent over the readings
topic with ``take_events``, one table with its changelog topic, Faust's recovery, rebalancing
and offset commits. What cannot be used as intended, and why:

=========================  ==================================================================
patch                      behaviour worked around
=========================  ==================================================================
``commit_applied``         Faust acks the messages a stream *skips* (flow stopped during a
                           rebalance, or fetched under an older generation) and commits them:
                           the next owner of the partition starts after readings nobody
                           applied. Also commits past a missing message after a seek back.
                           Commits only what the worker's state has applied (its mark).
``rewind_uncommitted``     aiokafka's ``seek_to_committed`` leaves a partition without a
                           committed offset where the fetcher stood: records Faust dropped
                           at a rebalance were never read again. Also seeks a readings
                           partition committed past the state's mark back to the mark.
``read_every_delivery``    Faust's fetch loop drops a record below the last offset it read;
                           after a seek back that mark can be ahead, so refetched records
                           were dropped unacked (lag stuck).
``keep_kept_partitions``   the in-memory store has no persisted offsets: recovery replayed a
                           worker's own changelog writes over partitions it kept.
``true_highwaters``        tansu 0.6.0's ListOffsets answers the last batch's base offset + 1:
                           recovery stopped before the end of a changelog partition.
``limit_fetch_wait``       Faust fixes aiokafka's ``fetch_max_wait_ms`` at 1500 ms; tansu
                           holds every fetch that long when idle.
=========================  ==================================================================

``install`` applies them once per process (idempotent: each patch wraps the library's
original, found through ``__wrapped__`` when applied again).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable

from faust.tables.recovery import Recovery
from faust.transport.consumer import Consumer as FaustConsumer
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

from pilotlab.kafka_admin import end_offsets

log = logging.getLogger("pilotlab.streams")


def _original(cls: type, name: str):
    """The library's own function, also when a patch of ours is installed already."""
    fn = cls.__dict__[name]
    return getattr(fn, "__wrapped__", fn)


def limit_fetch_wait(ms: int) -> None:
    """Faust creates its aiokafka consumer with ``fetch_max_wait_ms=1500`` and offers no
    setting for it; tansu answers a fetch only when that wait runs out, so every quiet
    moment would cost up to 1.5 s of latency. Set the worker's own value instead."""
    create = _original(AIOKafkaConsumerThread, "_create_worker_consumer")

    @functools.wraps(create)
    def _create_worker_consumer(self, transport):
        consumer = create(self, transport)
        consumer._fetch_max_wait_ms = ms  # read when the consumer starts its fetcher
        return consumer

    AIOKafkaConsumerThread._create_worker_consumer = _create_worker_consumer


def true_highwaters(bootstrap: str) -> None:
    """Faust's recovery reads a changelog partition up to its high watermark from ListOffsets,
    which tansu 0.6.0 understates: the last record batch's base offset + 1. A partition taken
    over from another worker was recovered without the rest of that batch. Take the end
    offsets a fetch reports (``pilotlab.kafka_admin.end_offsets``; on Apache Kafka the same
    values), so recovery reads what is there."""
    highwaters = _original(AIOKafkaConsumerThread, "_highwaters")

    @functools.wraps(highwaters)
    async def _highwaters(self, partitions):
        reported = dict(await highwaters(self, partitions))
        if self.consumer.in_transaction or not reported:
            return reported
        ends = await asyncio.to_thread(end_offsets, bootstrap, [(tp.topic, tp.partition) for tp in reported])
        return {tp: max(value or 0, ends[(tp.topic, tp.partition)]) for tp, value in reported.items()}

    AIOKafkaConsumerThread._highwaters = _highwaters


AppliedMark = Callable[[object], "int | None"]


def rewind_uncommitted() -> None:
    """When a rebalance starts (or flow stops) Faust drops the records it fetched but had not
    handed to a stream yet and seeks back to the committed offsets to fetch them again
    (``Consumer.perform_seek``). aiokafka's ``seek_to_committed`` skips a partition without a
    committed offset (none, or 0): it stays where the fetcher stood, and the dropped records of
    a partition the group never committed were skipped for good. Seek those stream partitions
    to their start (the worker skips what its state applied already).

    Also: a readings partition whose committed offset is ahead of the worker's state (its
    applied mark, ``app.pilotlab_applied``; see ``commit_applied``) is sought back to the
    mark. The commit is the mark, so this means the state was recovered short of what was
    committed; from the committed offset the records in between would reach no chunk (the
    agent would hold the first one back and seek itself, ``streams.checkpoint.admit``, but
    only once a record came). Only from the seek that ends a recovery: the app sets
    ``pilotlab_state_generation`` to the consumer generation whose recovery completed (Faust's
    ``on_rebalance_complete``); a seek before (flow stopped mid-rebalance) would compare with a
    state still being read."""
    perform_seek = _original(FaustConsumer, "perform_seek")

    @functools.wraps(perform_seek)
    async def _perform_seek(self) -> None:
        await perform_seek(self)
        changelogs = self.app.tables.changelog_topics
        applied: AppliedMark | None = getattr(self.app, "pilotlab_applied", None)
        if getattr(self.app, "pilotlab_state_generation", None) != getattr(self.app, "consumer_generation_id", 0):
            applied = None  # the state of this generation's partitions is not recovered yet
        for tp in self.assignment():
            if tp.topic in changelogs:
                continue
            committed = self._committed_offset.get(tp)
            mark = applied(tp) if applied is not None else None
            if not committed:
                await self.seek(tp, 0)  # before the log start: aiokafka resets to the earliest
            elif mark is not None and mark < committed:
                log.warning(
                    "%s partition %d: committed offset %d is ahead of the state's mark %d; seeking back to it",
                    tp.topic, tp.partition, committed, mark,
                )  # fmt: skip
                await self.seek(tp, mark)

    FaustConsumer.perform_seek = _perform_seek


def commit_applied() -> None:
    """Commit what the worker's state has applied, never more.

    Faust's stream acks the messages it *skips* — a message taken from the channel while
    flow is stopped for a rebalance, or one fetched under an older generation — "otherwise
    the lag would increase" (``Stream.__aiter__``), and commits acked offsets, also while
    the partitions are being revoked. Those readings were never applied: the partition's
    next owner started after them and they were missing from the KPIs (the two-worker kill
    test, about one run in several under load). Faust also commits past the committed offset
    when only the message at it is missing, and, after a seek back, fills "gaps" it saw
    in the offsets on top of the redelivered ones (our topics have no gaps: no compaction, no
    transactions), which made the committed offset crawl.

    A stream partition's commit is the worker's applied *mark* for it
    (``app.pilotlab_applied(tp)``, ``streams.checkpoint``): every offset below it is in the
    state the changelog holds, so a restart from there skips nothing and counts nothing
    twice (redeliveries below the mark are skipped). Other acked topics (none today) commit
    the run of acked offsets that starts at the committed one."""

    async def _add_gap(self, tp, offset_from: int, offset_to: int) -> None:
        return None

    def _new_offset(self, tp):
        acked = self._acked[tp]
        index = self._acked_index[tp]
        committed = self._committed_offset[tp]
        applied: AppliedMark | None = getattr(self.app, "pilotlab_applied", None)
        mark = applied(tp) if applied is not None else None
        if mark is not None:
            acked[:] = [o for o in acked if o >= mark]
            index.difference_update([o for o in index if o < mark])
            if mark > 0 and (committed is None or mark > committed) and tp in self.assignment():
                return mark
            return None
        if not acked:
            return None
        offsets = sorted({o for o in acked if committed is None or o >= committed})
        end = offsets[0] if offsets and committed is None else committed
        for offset in offsets:
            if offset != end:
                break
            end += 1
        acked[:] = [o for o in offsets if o >= end]
        index.difference_update([o for o in index if o < end])
        return end if offsets and end != committed else None

    _new_offset.__wrapped__ = _original(FaustConsumer, "_new_offset")
    _add_gap.__wrapped__ = _original(FaustConsumer, "_add_gap")
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
    drain = _original(FaustConsumer, "_drain_messages")

    @functools.wraps(drain)
    async def _drain_messages(self, fetcher) -> None:
        self._read_offset = _NoReadOffsets()
        await drain(self, fetcher)

    FaustConsumer._drain_messages = _drain_messages


def keep_kept_partitions() -> None:
    """Faust's in-memory store has no persisted offsets: at every rebalance, recovery reads a
    changelog partition the worker keeps from the last offset *recovery* read, i.e. replays
    the worker's own writes since over its table while the last chunk may still complete. A
    chunk's state could be rolled back under its own mark and committed offsets. The table of
    a partition the worker held as active through the previous recovery is current (its
    writes are confirmed before the table is), so recovery starts such partitions at their
    high watermark."""
    rebalance = _original(Recovery, "on_rebalance")
    build_offsets = _original(Recovery, "_build_offsets")
    completed = _original(Recovery, "on_recovery_completed")

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


def install(*, bootstrap: str, fetch_wait_ms: int) -> None:
    """Apply every patch (idempotent)."""
    limit_fetch_wait(fetch_wait_ms)
    true_highwaters(bootstrap)
    keep_kept_partitions()
    rewind_uncommitted()
    commit_applied()
    read_every_delivery()
