"""Event time in the pure engine: allowed lateness, revisions, out-of-order equality, device
liveness, and the new KPI kinds through ``apply_batch``."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import random
from types import SimpleNamespace

import pytest
from aiokafka.errors import IllegalStateError
from hypothesis import given, settings
from hypothesis import strategies as st

from pilotlab.contracts import KpiValue, Reading, ReadingBatch, to_ms
from pilotlab.manifest import Experiment
from streams import kpis
from streams.app import Rewinder
from streams.checkpoint import Chunk, Rewinds, admit, collector_paused, decode_entry, run_chunk
from streams.engine import (
    FIRST_REPORT,
    IMPACT_GROUP,
    advance,
    apply_batch,
    closes_at,
    kpi_values,
    split_late,
    window_key,
    window_start,
)
from streams.impact import estimate_impact

MIN = 60_000
EXP = Experiment.model_validate(
    {
        "id": "ev",
        "title": "t",
        "startup": "s",
        "district": "d",
        "location": {"lat": 45.0, "lon": 7.6},
        "periods": {
            "baseline": {"start": "2026-03-02T00:00:00Z", "end": "2026-03-02T01:00:00Z"},
            "intervention": {"start": "2026-03-02T01:00:00Z", "end": "2026-03-02T02:00:00Z"},
        },
        "devices": [
            {"id": "t1", "kind": "air_quality", "group": "treatment", "interval": "1m"},
            {"id": "t2", "kind": "air_quality", "group": "treatment", "interval": "1m"},
            {"id": "c1", "kind": "air_quality", "group": "control", "interval": "1m"},
        ],
        "lateness": "10m",
        "offline_after": 3,
        "kpis": [
            {"name": "pm_mean", "metric": "pm25", "kind": "mean", "window": "1m"},
            {"name": "pm_p95", "metric": "pm25", "kind": "quantile", "q": 0.95, "window": "15m"},
            {"name": "pm_over", "metric": "pm25", "kind": "exceedance", "threshold": 25, "window": "15m"},
            {"name": "pm_avail", "metric": "pm25", "kind": "availability", "window": "15m"},
            {"name": "pm_complete", "metric": "pm25", "kind": "completeness", "window": "15m"},
            {"name": "pm_fresh", "metric": "pm25", "kind": "freshness", "window": "15m"},
            {"name": "pm_impact", "metric": "pm25", "kind": "impact"},
        ],
    }
)
T0 = to_ms(EXP.periods.baseline.start)
GROUP = {"t1": "treatment", "t2": "treatment", "c1": "control"}


def batch(device: str, readings: list[Reading], received: int | None = None) -> ReadingBatch:
    rec = received if received is not None else max((r.ts_ms for r in readings), default=T0) + 5000
    return ReadingBatch("ev", device, GROUP[device], rec, tuple(readings))


class Pipeline:
    """The agent's per-message steps on dicts with JSON round trips (as in a changelog)."""

    def __init__(self) -> None:
        self.windows: dict = {}
        self.clock: dict | None = None
        self.latest: dict[tuple, KpiValue] = {}
        self.late: list[Reading] = []
        self.status: list = []

    def feed(self, b: ReadingBatch) -> list[KpiValue]:
        on_time, late = split_late(b, EXP, self.clock and self.clock["wm"])
        self.late.extend(late)

        def load(k):
            v = self.windows.get(k)
            return None if v is None else json.loads(json.dumps(v))

        def store(k, v):
            self.windows[k] = json.loads(json.dumps(v))

        out = kpi_values(EXP, apply_batch(on_time, EXP, load, store), load)
        for v in out:
            assert v.key() not in self.latest or self.latest[v.key()].revision < v.revision
            self.latest[v.key()] = v
        self.clock, events = advance(self.clock, b, EXP)
        self.clock = json.loads(json.dumps(self.clock))
        self.status.extend(events)
        return out

    def values(self) -> dict[tuple, tuple]:
        return {k: (v.value, v.sample_count, json.dumps(v.details, sort_keys=True)) for k, v in self.latest.items()}


def test_reading_within_lateness_revises_its_window() -> None:
    p = Pipeline()
    p.feed(batch("t1", [Reading(1, T0 + 10_000, {"pm25": 10.0})]))
    p.feed(batch("t1", [Reading(2, T0 + 5 * MIN, {"pm25": 30.0})]))  # watermark moves on 5 min
    out = p.feed(batch("t2", [Reading(1, T0 + 20_000, {"pm25": 20.0})]))  # window [T0, T0+1m) again
    mean = next(v for v in out if v.kpi == "pm_mean")
    assert (mean.window_start_ms, mean.value, mean.sample_count, mean.revision) == (T0, 15.0, 2, 2)
    assert p.late == []


def test_reading_past_lateness_goes_late_and_changes_nothing() -> None:
    p = Pipeline()
    p.feed(batch("t1", [Reading(1, T0 + 10_000, {"pm25": 10.0})]))
    p.feed(batch("t1", [Reading(2, T0 + 30 * MIN, {"pm25": 30.0})]))
    before = p.values()
    late = Reading(1, T0 + 20_000, {"pm25": 99.0})
    # its 1-minute window ended at T0+1m; +10m lateness = T0+11m ≤ watermark T0+30m
    assert closes_at(late, EXP) == T0 + 11 * MIN
    out = p.feed(batch("t2", [late]))
    assert out == []
    assert p.late == [late]
    assert p.values() == before


def test_late_readings_are_split_from_on_time_ones_in_one_batch() -> None:
    b = batch("t1", [Reading(1, T0, {"pm25": 1.0}), Reading(2, T0 + 40 * MIN, {"pm25": 2.0})])
    kept, late = split_late(b, EXP, T0 + 30 * MIN)
    assert [r.seq for r in kept.readings] == [2] and [r.seq for r in late] == [1]
    assert split_late(b, EXP, None) == (b, ())


def readings_stream(rng: random.Random, n: int) -> list[ReadingBatch]:
    out = []
    for i in range(n):
        device = rng.choice(["t1", "t2", "c1"])
        ts = T0 + i * 20_000 + rng.randrange(0, 15_000)
        out.append(batch(device, [Reading(i, ts, {"pm25": round(rng.uniform(5, 60), 3)})], received=ts + 2000))
    return out


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 4))
def test_out_of_order_within_lateness_gives_the_same_final_kpis(seed, jitter) -> None:
    """Shuffle the arrival order locally (never more than the lateness allows): the final KPI
    values equal the in-order run's (exactly for counts, sketches and shares; means to rounding)."""
    rng = random.Random(seed)
    ordered = readings_stream(rng, 120)
    shuffled = list(ordered)
    block = 5 * jitter  # 5 readings ≈ 100 s of event time: far within 10 minutes of lateness
    for i in range(0, len(shuffled), block):
        part = shuffled[i : i + block]
        rng.shuffle(part)
        shuffled[i : i + block] = part
    a, b = Pipeline(), Pipeline()
    for x in ordered:
        a.feed(x)
    for x in shuffled:
        b.feed(x)
    assert a.late == b.late == []
    va, vb = a.values(), b.values()
    assert va.keys() == vb.keys()
    for k in va:
        (x, n, da), (y, m, db) = va[k], vb[k]
        assert n == m
        if x is None or y is None:  # e.g. an impact before both periods have data
            assert x is y
        else:
            assert x == pytest.approx(y, rel=1e-9, abs=1e-12)
        if k[1] not in ("pm_impact", "pm_mean"):
            assert da == db  # counts, sketches, shares and their details: exactly equal


def test_new_kinds_through_the_engine() -> None:
    p = Pipeline()
    for i in range(15):  # t1 reports every minute of the first quarter hour, t2 once
        p.feed(batch("t1", [Reading(i, T0 + i * MIN, {"pm25": 20.0 + i})], received=T0 + i * MIN + 3000))
    t2_ts = T0 + 14 * MIN + 30_000
    p.feed(batch("t2", [Reading(1, t2_ts, {"pm25": 50.0})], received=t2_ts + 9000))
    q = (T0 // (900_000)) * 900_000
    get = lambda name: p.latest[(  # noqa: E731
        "ev", name, "treatment", 900, q)]
    assert get("pm_avail").value == 1.0  # both treatment devices reported
    assert get("pm_complete").value == pytest.approx(16 / 30)
    assert get("pm_complete").details == {"received": 16, "expected": 30.0}
    assert get("pm_over").value == pytest.approx(sum(20 + i > 25 for i in range(15)) / 16 + 1 / 16)
    assert abs(get("pm_p95").value - 34.0) <= 0.34  # rank ⌊0.95·15⌋ of 20…34, 50
    assert get("pm_fresh").value == pytest.approx(3.0, rel=0.01)
    impact = p.latest[("ev", "pm_impact", IMPACT_GROUP, 7200, T0)]
    assert impact.sample_count == 16 and impact.value is None  # no intervention data yet


def test_impact_window_spans_the_experiment_and_equals_estimate_impact() -> None:
    """The engine's impact (as the worker stores it) is streams.impact.estimate_impact of the
    same readings, fed in another order."""
    p = Pipeline()
    rng = random.Random(1)
    t_int = to_ms(EXP.periods.intervention.start)
    sent = []
    for start in (T0, t_int):
        for i in range(50):
            for device in ("t1", "t2", "c1"):
                eff = 0.7 if device != "c1" and start == t_int else 1.0
                ts = start + i * MIN
                value = 30 * eff * rng.uniform(0.9, 1.1)
                sent.append((device, ts, value))
                p.feed(batch(device, [Reading(i, ts, {"pm25": value})]))
    assert p.late == []
    v = p.latest[("ev", "pm_impact", IMPACT_GROUP, 7200, T0)]
    assert v.details["readings"] == {
        "treatment": {"baseline": 100, "intervention": 100},
        "control": {"baseline": 50, "intervention": 50},
    }
    assert v.details["devices"] == {"treatment": 2, "control": 1}
    assert v.value == pytest.approx(-0.3, abs=0.05)
    rng.shuffle(sent)
    want = estimate_impact(EXP, "pm_impact", sent).as_dict()
    assert v.value == pytest.approx(want["estimate"], rel=1e-12)
    for key in ("ci_low", "ci_high", "se", "df"):
        assert v.details[key] == pytest.approx(want[key], rel=1e-9), key
    for key in ("verdict", "warnings", "devices", "readings", "scale", "method", "final"):
        assert v.details[key] == want[key], key
    # one control device and a one-hour pilot: an interval, but no verdict
    assert v.details["verdict"] == "inconclusive"
    assert {"no_replication", "short_period"} <= set(v.details["warnings"])


# --- liveness ------------------------------------------------------------------------------------


def test_device_goes_offline_after_n_intervals_and_online_on_return() -> None:
    p = Pipeline()
    p.feed(batch("t1", [Reading(1, T0, {"pm25": 1.0})]))
    p.feed(batch("t2", [Reading(1, T0 + 30_000, {"pm25": 1.0}), Reading(2, T0, {"pm25": 1.0})]))
    # each device's first batch reports it online at the batch's oldest reading
    assert [(s.device_id, s.status, s.ts_ms, s.last_seen_ms, s.detail) for s in p.status] == [
        ("t1", "online", T0, T0, FIRST_REPORT),
        ("t2", "online", T0, T0 + 30_000, FIRST_REPORT),
    ]
    p.feed(batch("t2", [Reading(3, T0 + 2 * MIN, {"pm25": 1.0})]))
    assert len(p.status) == 2  # t1 silent 2 intervals: not yet
    p.feed(batch("t2", [Reading(4, T0 + 3 * MIN, {"pm25": 1.0})]))
    assert [(s.device_id, s.status, s.ts_ms, s.last_seen_ms) for s in p.status[2:]] == [
        ("t1", "offline", T0 + 3 * MIN, T0)
    ]
    p.feed(batch("t2", [Reading(5, T0 + 4 * MIN, {"pm25": 1.0})]))
    assert len(p.status) == 3  # reported once
    p.feed(batch("t1", [Reading(2, T0 + 5 * MIN, {"pm25": 1.0})]))
    assert [(s.device_id, s.status, s.ts_ms, s.detail) for s in p.status[3:]] == [
        ("t1", "online", T0 + 5 * MIN, "reporting again")
    ]


def test_a_device_this_registry_copy_does_not_list_yet_still_gets_its_first_report() -> None:
    """Ingest authorised the device (its registry copy is ahead of the worker's, just after a
    manifest change): the first batch reports it online all the same, and once the manifest
    lists it, it is judged like any other device (no second first report)."""
    without = EXP.model_copy(update={"devices": [d for d in EXP.devices if d.id != "t1"]})
    clock, events = advance(None, batch("t1", [Reading(1, T0, {"pm25": 1.0})]), without)
    assert [(e.device_id, e.status, e.ts_ms, e.detail) for e in events] == [("t1", "online", T0, FIRST_REPORT)]
    clock, events = advance(clock, batch("t1", [Reading(2, T0 + MIN, {"pm25": 1.0})]), EXP)
    assert events == []
    clock, events = advance(clock, batch("t2", [Reading(1, T0 + 10 * MIN, {"pm25": 1.0})]), EXP)
    assert [(e.device_id, e.status) for e in events] == [("t2", "online"), ("t1", "offline")]


def reference_liveness(stream: list[ReadingBatch]) -> list[tuple]:
    """Liveness by the definition, scanning every device after every batch (no due time)."""
    wm, devices, out = None, {}, []
    for b in stream:
        if b.readings:
            newest = max(r.ts_ms for r in b.readings)
            last, status = devices.get(b.device_id, (None, None))
            if last is None:  # its first batch: a first report
                out.append((b.device_id, "online", min(r.ts_ms for r in b.readings)))
            if status == "offline" and newest > last:
                out.append((b.device_id, "online", newest))
                status = "online"
            devices[b.device_id] = (newest if last is None else max(last, newest), status or "online")
            wm = newest if wm is None else max(wm, newest)
        for d in sorted(devices):
            last, status = devices[d]
            silent_at = last + EXP.offline_after * EXP.device(d).interval * 1000
            if status == "online" and wm is not None and silent_at <= wm:
                devices[d] = (last, "offline")
                out.append((d, "offline", silent_at))
    return out


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["t1", "t2", "c1"]), st.integers(0, 40)), max_size=60))
def test_liveness_equals_scanning_every_device_after_every_batch(plan) -> None:
    stream = [batch(d, [Reading(i, T0 + minute * MIN, {"pm25": 1.0})]) for i, (d, minute) in enumerate(plan)]
    clock, got = None, []
    for b in stream:
        clock, events = advance(clock, b, EXP)
        clock = json.loads(json.dumps(clock))
        got.extend((e.device_id, e.status, e.ts_ms) for e in events)
    assert got == reference_liveness(stream)


def test_an_offline_device_sending_an_older_reading_stays_offline() -> None:
    p = Pipeline()
    p.feed(batch("t1", [Reading(1, T0 + 2 * MIN, {"pm25": 1.0})]))
    p.feed(batch("t2", [Reading(1, T0 + 20 * MIN, {"pm25": 1.0})]))  # t1 offline
    p.feed(batch("t1", [Reading(2, T0 + MIN, {"pm25": 1.0})]))  # older than its last: not a return
    p.feed(batch("t1", [Reading(3, T0 + 21 * MIN, {"pm25": 1.0})]))  # back
    assert [(s.device_id, s.status) for s in p.status] == [
        ("t1", "online"),  # first reports
        ("t2", "online"),
        ("t1", "offline"),
        ("t1", "online"),
    ]


def test_liveness_state_is_json_and_replays_identically() -> None:
    stream = readings_stream(random.Random(5), 60)
    stream.insert(30, batch("c1", [Reading(999, T0 + 60 * MIN, {"pm25": 1.0})]))  # a jump: others offline
    a, b = Pipeline(), Pipeline()
    for x in stream:
        a.feed(x)
        b.feed(x)
    assert a.status == b.status and any(s.status == "offline" for s in a.status)


# --- crash and replay: chunks cut anywhere, then redelivery in other chunks --------------------


class Crash(Exception):
    pass


class Worker:
    """The agent's chunk loop over a changelog (a dict of entry bytes) and a sink that keeps
    the highest revision per KPI window (as storage does). ``budget`` is how many sends
    (outputs, then state entries, then the mark) survive before a kill -9."""

    def __init__(self) -> None:
        self.changelog: dict[str, bytes] = {}
        self.sink = {"kpis": {}, "late": set(), "status": set()}
        self.budget: int | None = None

    def send(self) -> None:
        if self.budget is not None:
            if self.budget == 0:
                raise Crash
            self.budget -= 1

    def run(self, messages: list[ReadingBatch], start: int, sizes: list[int]) -> None:
        offset, sizes = start, list(sizes)
        while offset < len(messages):
            n = sizes.pop(0) if sizes else 3
            chunk = Chunk(self.changelog.get, 0)
            part = [(o, messages[o], EXP) for o in range(offset, min(offset + n, len(messages)))]
            out = run_chunk(chunk, part, horizon_ms=6 * 3600_000)
            for values in out.kpis.values():
                self.send()
                for v in values:
                    if v.key() not in self.sink["kpis"] or self.sink["kpis"][v.key()].revision <= v.revision:
                        self.sink["kpis"][v.key()] = v
            for held in out.late:
                self.send()
                self.sink["late"].update((r.seq, r.ts_ms) for r in held.readings)
            for t in out.transitions:
                self.send()
                self.sink["status"].add((t.device_id, t.status, t.ts_ms))
            for k, v in out.writes:
                self.send()
                self.changelog[k] = v
            offset += n


def crash_stream(seed: int) -> list[ReadingBatch]:
    messages = readings_stream(random.Random(seed), 40)
    messages.insert(20, messages[10])  # an MQTT redelivery: the same readings in a new message
    messages.insert(30, batch("t2", [Reading(777, T0 + 60_000, {"pm25": 1.0})]))  # late by then
    messages.insert(35, batch("c1", [Reading(778, T0 + 90 * MIN, {"pm25": 1.0})]))  # others go offline
    return messages


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**32 - 1), st.data())
def test_a_kill_anywhere_in_a_chunk_then_replay_in_other_chunks_equals_a_clean_run(seed, data) -> None:
    messages = crash_stream(seed)
    chunks = st.lists(st.integers(1, 12), min_size=1, max_size=12)
    clean = Worker()
    clean.run(messages, 0, [len(messages)])

    worker = Worker()
    worker.budget = data.draw(st.integers(0, 120), label="sends that survive")
    with contextlib.suppress(Crash):
        worker.run(messages, 0, data.draw(chunks, label="chunks before the kill"))
    worker.budget = None
    # restart: Kafka redelivers from the last commit, at or before the applied mark
    mark = int(worker.changelog.get("a|0", b"0"))
    committed = data.draw(st.integers(0, mark), label="committed offset")
    worker.run(messages, committed, data.draw(chunks, label="chunks after the restart"))

    assert {k: (v.value, v.sample_count, v.revision) for k, v in worker.sink["kpis"].items()} == {
        k: (v.value, v.sample_count, v.revision) for k, v in clean.sink["kpis"].items()
    }
    assert worker.sink["late"] == clean.sink["late"] and worker.sink["status"] == clean.sink["status"]
    assert clean.sink["late"] and clean.sink["status"]  # the scenario exercises both
    # and the restored state is the clean run's, entry for entry
    assert {k: decode_entry(v)[1] for k, v in worker.changelog.items() if k != "a|0"} == {
        k: decode_entry(v)[1] for k, v in clean.changelog.items() if k != "a|0"
    }


def test_an_entry_of_a_chunk_cut_short_reads_as_its_value_before() -> None:
    changelog: dict[str, bytes] = {}
    chunk = Chunk(changelog.get, 3)
    chunk.take(0)
    chunk.put("k", {"v": 1})
    changelog.update(chunk.writes())
    assert changelog["a|3"] == b"1"
    chunk = Chunk(changelog.get, 3)
    chunk.take(1)
    chunk.take(2)
    chunk.put("k", {"v": 2})
    *entries, mark = chunk.writes()
    changelog.update(entries)  # killed before the mark
    assert Chunk(changelog.get, 3).get("k") == {"v": 1}
    changelog.update([mark])
    assert Chunk(changelog.get, 3).get("k") == {"v": 2}
    assert Chunk(changelog.get, 3).applied(2) and not Chunk(changelog.get, 3).applied(3)


# --- a message's values folded at once = one reading at a time ---------------------------------


def apply_by_reading(b: ReadingBatch, windows: dict) -> dict[str, set[str]]:
    """The plain fold ``apply_batch`` stands for: each reading through each KPI's ``add``, in
    order (the engine before it folded a message's values per window with ``add_all``)."""
    touched: dict[str, set[str]] = {}
    for kpi in EXP.kpis:
        agg, sig = kpis.make(kpi, EXP), kpi.signature()
        for r in b.readings:
            value = r.metrics.get(kpi.metric)
            if value is None:
                continue
            if kpi.kind == "impact":
                if agg.period(r.ts_ms) is None:
                    continue
                k = window_key(b.experiment_id, IMPACT_GROUP, agg.window_size_s, agg.window_start_ms)
            else:
                k = window_key(b.experiment_id, b.group, kpi.window, window_start(r.ts_ms, kpi.window))
            window = windows.setdefault(k, {})
            touched.setdefault(k, set())
            state = window.get(kpi.name)
            if state is None or state["k"] != sig:
                state = window[kpi.name] = {"k": sig, "s": agg.initialize(), "n": 0, "r": state["r"] if state else 0}
            state["s"] = agg.add(state["s"], kpis.Obs(value, r.ts_ms, b.device_id, b.group, b.received_ms))
            state["n"] += 1
            touched[k].add(kpi.name)
    for k, names in touched.items():
        for name in names:
            windows[k][name]["r"] += 1
    return touched


READING = st.tuples(
    st.integers(min_value=-2 * MIN, max_value=2 * MIN),  # around the message's own time
    st.floats(min_value=-50, max_value=500, allow_nan=False),
    st.sets(st.sampled_from(["pm25", "no2"]), max_size=2),
)
MESSAGE = st.tuples(
    st.sampled_from(sorted(GROUP)),
    st.integers(min_value=-10 * MIN, max_value=130 * MIN),  # before, in and after both periods
    st.lists(READING, max_size=12),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(MESSAGE, max_size=6))
def test_apply_batch_equals_one_reading_at_a_time(messages) -> None:
    """Windows, samples, revisions and the order windows are first touched in: all the same
    as the plain per-reading fold, over messages within one window or spanning several,
    readings missing the metric, inside, across and outside the impact periods, out of order."""
    fast: dict = {}
    plain: dict = {}
    for seq, (device, base, rows) in enumerate(messages):
        readings = [
            Reading(seq * 100 + i, T0 + base + off, {m: v for m in metrics})
            for i, (off, v, metrics) in enumerate(rows)
        ]
        b = batch(device, readings, received=T0 + 200 * MIN)
        touched = apply_batch(b, EXP, fast.get, fast.__setitem__)
        assert list(touched.items()) == list(apply_by_reading(b, plain).items())
    assert repr(fast) == repr(plain)


def test_collector_paused_only_within_and_as_it_was() -> None:
    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with contextlib.suppress(ValueError), collector_paused():
        raise ValueError("a chunk that fails")
    assert gc.isenabled()  # back on after an error too
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()  # a collector someone else turned off stays off
    finally:
        gc.enable()


@pytest.mark.parametrize(
    ("expected", "offsets", "want"),
    [
        (5, [5, 6, 7], ([5, 6, 7], 0, None, [])),
        (5, [3, 4, 5, 6], ([5, 6], 2, None, [])),  # redelivered below the mark: skipped
        (5, [5, 6, 5, 6, 7], ([5, 6, 7], 2, None, [])),  # delivered twice after a seek back
        (5, [5, 6, 9, 10], ([5, 6], 0, (7, 9), [9, 10])),  # 7 and 8 never came: held back from 9
        (5, [8, 5, 6], ([5, 6], 0, (7, 8), [8])),  # a record fetched before a seek, first
        (5, [8, 5, 6, 7, 8], ([5, 6, 7, 8], 1, None, [])),  # ... and again after it: a redelivery
        (5, [9, 6, 5], ([5], 0, (6, 6), [9, 6])),  # held back in delivery order
        (0, [3, 4], ([], 0, (0, 3), [3, 4])),  # no mark yet: a log that starts at 3 is a gap too
        (5, [], ([], 0, None, [])),
    ],
)
def test_admit_takes_the_offsets_that_follow_on_from_the_state(expected, offsets, want) -> None:
    out = admit(expected, offsets, lambda o: o)
    assert (out.messages, out.skipped, out.gap, list(out.rest)) == want  # taken, skipped, gap, held back


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_seeking_back_at_every_gap_applies_each_offset_once_in_order(data) -> None:
    """A partition's log 0..n-1 delivered the way a consumer can get it wrong: a position ahead
    of the state (a commit past the mark; with records left to deliver, else the recovery's own
    seek catches it up), records fetched before a seek arriving after it, redeliveries. The
    worker's loop (admit, seek back to the offset expected at a gap, hold the rest back)
    applies every offset exactly once, in order."""
    n = data.draw(st.integers(1, 60), label="records")
    position = data.draw(st.integers(0, n), label="position the consumer starts at")
    if position == n:  # ahead of the state with nothing left to deliver: no record shows a gap;
        position = 0  # the recovery's seek back to the mark does it (faust_compat.rewind_uncommitted)
    applied: list[int] = []
    mark = 0
    for _ in range(8 * n + 20):  # chunks
        if mark == n:
            break
        # what reaches the agent: a run from the consumer's position, maybe after a few stale
        # records from anywhere in the log (fetched before a seek), maybe repeated
        stale = data.draw(st.lists(st.integers(0, n - 1), max_size=3), label="stale")
        run = list(range(position, min(n, position + data.draw(st.integers(1, 10), label="run"))))
        delivered = stale + run
        position += len(run)
        out = admit(mark, delivered, lambda o: o)
        applied += out.messages
        mark += len(out.messages)
        if out.gap is not None:
            position = out.gap[0]  # the seek back (nothing deleted: the log starts at 0)
    else:
        pytest.fail("never caught up")
    assert applied == list(range(n))


def test_rewinds_hold_back_until_the_offset_expected_comes_or_a_seek_is_due_again() -> None:
    r = Rewinds(retry_s=10.0)
    assert r.target(0, 7, now=0.0) is None  # never sought: seek
    r.sought(0, 7, 7, now=0.0)
    assert r.target(0, 7, now=5.0) == 7  # sought: hold the stale records back, no new seek
    assert r.target(0, 7, now=10.0) is None  # not there after retry_s: seek again
    assert r.target(1, 7, now=5.0) is None  # per partition
    r.sought(0, 7, 7, now=10.0)
    assert r.target(0, 9, now=11.0) is None  # a new gap further on: seek
    r.sought(0, 9, 12, now=11.0)  # the log starts at 12: 9..11 deleted
    assert r.target(0, 9, now=12.0) == 12
    r.reached(0)
    assert r.target(0, 9, now=12.0) is None
    r.sought(1, 3, 3, now=0.0)
    r.forget()
    assert r.target(1, 3, now=1.0) is None


class FakeConsumer:
    """Faust's consumer as the rewinder uses it (a unit test of the worker's own logic)."""

    def __init__(self, start: int, assigned: bool = True) -> None:
        self.start, self.assigned, self.seeks = start, assigned, []

    async def earliest_offsets(self, *tps):
        return dict.fromkeys(tps, self.start)

    async def seek(self, tp, offset):
        if not self.assigned:
            raise IllegalStateError("No current assignment for partition")
        self.seeks.append((tp.partition, offset))


def rewinder(consumer: FakeConsumer, clock: list[float]) -> Rewinder:
    counts = {"rewound": 0}
    observer = SimpleNamespace(rewound=lambda: counts.__setitem__("rewound", counts["rewound"] + 1))
    return Rewinder(SimpleNamespace(consumer=consumer), observer, clock=lambda: clock[0], retry_s=10.0)


def test_a_gap_is_sought_back_to_the_offset_expected_once_until_it_comes() -> None:
    consumer, clock = FakeConsumer(start=0), [0.0]
    r = rewinder(consumer, clock)
    assert asyncio.run(r.take_past_gap(2, 7, 9)) is False
    assert consumer.seeks == [(2, 7)]
    clock[0] = 5.0
    assert asyncio.run(r.take_past_gap(2, 7, 10)) is False  # fetched before the seek: held back
    assert consumer.seeks == [(2, 7)]
    clock[0] = 10.0
    assert asyncio.run(r.take_past_gap(2, 7, 11)) is False  # still not there: seek again
    assert consumer.seeks == [(2, 7), (2, 7)]


def test_a_gap_the_log_no_longer_holds_is_taken() -> None:
    consumer, clock = FakeConsumer(start=9), [0.0]
    r = rewinder(consumer, clock)
    assert asyncio.run(r.take_past_gap(0, 7, 9)) is True  # 7 and 8 deleted (retention)
    assert consumer.seeks == []
    consumer.start = 8
    assert asyncio.run(r.take_past_gap(0, 5, 9)) is False  # 5..7 deleted, 8 is there: fetch it
    assert consumer.seeks == [(0, 8)]
    assert asyncio.run(r.take_past_gap(0, 5, 10)) is False  # a record fetched before the seek
    assert asyncio.run(r.take_past_gap(0, 5, 8)) is True  # the log's first record: from there on


def test_a_partition_revoked_before_its_seek_is_left_to_its_next_owner() -> None:
    consumer, clock = FakeConsumer(start=0, assigned=False), [0.0]
    assert asyncio.run(rewinder(consumer, clock).take_past_gap(1, 3, 4)) is False


def test_a_packed_record_runs_like_its_messages_one_by_one() -> None:
    """Ingest packs several messages' batches into one record (pilotlab.contracts.pack_batches):
    they share its offset, run in order, and a redelivered record is skipped whole."""
    msgs = [batch("t1", [Reading(o, T0 + o * 1000, {"pm25": float(o)})]) for o in range(6)]
    alone = run_chunk(Chunk({}.get, 0), [(o, b, EXP) for o, b in enumerate(msgs)], horizon_ms=6 * 3600_000)
    state: dict[str, bytes] = {}
    packed = run_chunk(Chunk(state.get, 0), [(i // 3, b, EXP) for i, b in enumerate(msgs)], horizon_ms=6 * 3600_000)
    assert packed.kpis == alone.kpis
    values = {k: decode_entry(v)[1] for k, v in alone.writes if not k.startswith("a|")}
    assert {k: decode_entry(v)[1] for k, v in packed.writes if not k.startswith("a|")} == values
    assert dict(packed.writes)["a|0"] == b"2"  # two records
    state.update(packed.writes)
    again = run_chunk(Chunk(state.get, 0), [(1, b, EXP) for b in msgs[3:]], horizon_ms=6 * 3600_000)
    assert again.skipped == 3 and not again.kpis
