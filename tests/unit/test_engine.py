"""The KPI engine without Faust: fold ``ReadingBatch``es into a dict store and recompute."""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pilotlab.contracts import KpiValue, Reading, ReadingBatch
from pilotlab.manifest import Experiment, load_manifest
from streams.engine import apply_batch, kpi_values, screen, window_start

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_773_576_000_000  # 2026-03-15T12:00:00Z, an hour boundary

EXPERIMENT = Experiment.model_validate(
    {
        "id": "engine-test",
        "title": "Engine test",
        "startup": "Test",
        "district": "Nowhere",
        "location": {"lat": 45.0, "lon": 7.6},
        "periods": {
            "baseline": {"start": "2026-03-01T00:00:00Z", "end": "2026-03-15T00:00:00Z"},
            "intervention": {"start": "2026-03-15T00:00:00Z", "end": "2026-03-29T00:00:00Z"},
        },
        "devices": [
            {"id": "t-1", "kind": "air_quality", "group": "treatment", "interval": "1m"},
            {"id": "t-2", "kind": "air_quality", "group": "treatment", "interval": "1m"},
            {"id": "c-1", "kind": "air_quality", "group": "control", "interval": "1m"},
        ],
        "kpis": [
            {"name": "no2_mean", "metric": "no2", "kind": "mean", "window": "1m"},
            {"name": "no2_sum", "metric": "no2", "kind": "sum", "window": "1m"},
            {"name": "no2_min", "metric": "no2", "kind": "min", "window": "1m"},
            {"name": "no2_max", "metric": "no2", "kind": "max", "window": "1m"},
            {"name": "no2_count", "metric": "no2", "kind": "count", "window": "1m"},
            {"name": "pm25_hourly", "metric": "pm25", "kind": "mean", "window": "1h"},
            {"name": "pm25_hourly_total", "metric": "pm25", "kind": "sum", "window": 3600},
            {"name": "noise_5m_max", "metric": "noise", "kind": "max", "window": "5m"},
        ],
    }
)
GROUP_OF = {d.id: d.group for d in EXPERIMENT.devices}


class Store(dict):
    """A dict with the load/store callables the engine expects. Every stored value goes
    through a JSON round trip, as it would through a Faust table's changelog, and the
    latest ``KpiValue`` of each KPI window is kept as the engine returns it."""

    def __init__(self) -> None:
        super().__init__()
        self.loads: list[str] = []
        self.stores: list[str] = []
        self.latest: dict[tuple, KpiValue] = {}

    def load(self, key: str) -> object:
        self.loads.append(key)
        value = self.get(key)
        return None if value is None else json.loads(json.dumps(value))

    def store(self, key: str, state: object) -> None:
        self.stores.append(key)
        self[key] = json.loads(json.dumps(state))

    def apply(self, b: ReadingBatch, exp: Experiment = EXPERIMENT) -> list[KpiValue]:
        self.loads.clear()
        self.stores.clear()
        out = kpi_values(exp, apply_batch(b, exp, self.load, self.store), self.get)
        for v in out:
            self.latest[v.key()] = v
        return out

    def values(self) -> dict[tuple, tuple[float | None, int]]:  # type: ignore[override]
        return {k: (v.value, v.sample_count) for k, v in self.latest.items()}

    def revisions(self) -> dict[tuple, int]:
        return {k: v.revision for k, v in self.latest.items()}


def batch(device: str, readings: list[Reading], exp: Experiment = EXPERIMENT) -> ReadingBatch:
    group = exp.device(device).group
    return ReadingBatch(exp.id, device, group, T0, tuple(readings))


def fold(batches: list[ReadingBatch], exp: Experiment = EXPERIMENT) -> Store:
    store = Store()
    for b in batches:
        store.apply(b, exp)
    return store


def key(kpi: str, group: str, size_s: int, start_ms: int, exp_id: str = EXPERIMENT.id) -> tuple:
    """The same key as ``KpiValue.key()``."""
    return (exp_id, kpi, group, size_s, start_ms)


def windows_touched(b: ReadingBatch, exp: Experiment = EXPERIMENT) -> set[tuple]:
    return {
        key(kpi.name, b.group, kpi.window, window_start(r.ts_ms, kpi.window), exp.id)
        for r in b.readings
        for kpi in exp.kpis
        if kpi.metric in r.metrics
    }


def recompute(
    readings: list[tuple[str, Reading]], exp: Experiment = EXPERIMENT
) -> dict[tuple, tuple[float, int]]:
    """Straight from the raw readings, with the standard library: (kpi, group, window) → value."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for device, r in readings:
        for kpi in exp.kpis:
            if kpi.metric in r.metrics:
                start = r.ts_ms - r.ts_ms % (kpi.window * 1000)
                groups[key(kpi.name, GROUP_OF[device], kpi.window, start, exp.id)].append(
                    r.metrics[kpi.metric]
                )
    kinds = {k.name: k.kind for k in exp.kpis}
    ref = {
        "count": lambda v: float(len(v)),
        "sum": math.fsum,
        "mean": statistics.fmean,
        "min": min,
        "max": max,
    }
    return {k: (ref[kinds[k[1]]](v), len(v)) for k, v in groups.items()}


def assert_same_values(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k, (value, n) in want.items():
        assert got[k][1] == n, k
        assert got[k][0] == pytest.approx(value, rel=1e-9, abs=1e-9), k


# --- window_start -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ts_ms", "size_s", "expected"),
    [
        (T0, 60, T0),
        (T0 + 1, 60, T0),
        (T0 + 59_999, 60, T0),
        (T0 + 60_000, 60, T0 + 60_000),
        (T0 - 1, 60, T0 - 60_000),
        (T0 + 61_500, 60, T0 + 60_000),
        (T0, 3600, T0),
        (T0 + 3_599_999, 3600, T0),
        (T0 + 3_600_000, 3600, T0 + 3_600_000),
        (T0 - 1, 3600, T0 - 3_600_000),
        (T0 + 25 * 60_000 + 7, 3600, T0),
        (0, 60, 0),
        (-1, 60, -60_000),  # before the epoch: floor, not truncation
        (T0 + 299_999, 300, T0),
    ],
)
def test_window_start_table(ts_ms: int, size_s: int, expected: int) -> None:
    assert window_start(ts_ms, size_s) == expected


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=-(10**15), max_value=10**15), st.sampled_from([1, 60, 300, 900, 3600, 86400]))
def test_window_start_property(ts_ms: int, size_s: int) -> None:
    start = window_start(ts_ms, size_s)
    assert start % (size_s * 1000) == 0
    assert start <= ts_ms < start + size_s * 1000
    assert window_start(start, size_s) == start


def test_window_start_aligns_to_the_utc_clock() -> None:
    # 2026-03-15T12:34:56.789Z
    ts = T0 + (34 * 60 + 56) * 1000 + 789
    assert window_start(ts, 60) == T0 + 34 * 60_000  # 12:34:00
    assert window_start(ts, 3600) == T0  # 12:00:00
    assert window_start(ts, 86400) == T0 - 12 * 3_600_000  # midnight


# --- folding batches ----------------------------------------------------------------------------


def sample_readings() -> list[tuple[str, Reading]]:
    out = []
    for i in range(40):
        device = ("t-1", "t-2", "c-1")[i % 3]
        ts = T0 + i * 17_000 + (i % 5) * 3_600_000
        metrics = {"no2": 10.0 + (i * 7) % 31, "pm25": 5.0 + (i * 3) % 11}
        if i % 4 == 0:
            del metrics["pm25"]
        if i % 6 == 0:
            metrics = {"noise": 40.0 + i}  # no KPI on no2/pm25 for this reading
        if i % 9 == 0:
            metrics["temperature"] = 12.0  # no KPI at all on temperature
        out.append((device, Reading(seq=i, ts_ms=ts, metrics=metrics)))
    return out


def batches_of(readings: list[tuple[str, Reading]], size: int) -> list[ReadingBatch]:
    """Consecutive runs of ``size`` readings, one batch per device within each run."""
    out = []
    for start in range(0, len(readings), size):
        per_device: dict[str, list[Reading]] = defaultdict(list)
        for device, r in readings[start : start + size]:
            per_device[device].append(r)
        out.extend(batch(d, rs) for d, rs in per_device.items())
    return out


def test_fold_equals_recomputation() -> None:
    readings = sample_readings()
    store = fold(batches_of(readings, 7))
    assert_same_values(store.values(), recompute(readings))


def test_returned_kpi_values_are_complete() -> None:
    readings = sample_readings()
    store = fold(batches_of(readings, 5))
    kpis = {k.name: k for k in EXPERIMENT.kpis}
    want = recompute(readings)
    assert store.latest.keys() == want.keys()
    for k, v in store.latest.items():
        assert isinstance(v, KpiValue)
        assert v.key() == k
        assert v.experiment_id == EXPERIMENT.id
        assert v.metric == kpis[v.kpi].metric
        assert v.kind == kpis[v.kpi].kind
        assert v.window_size_s == kpis[v.kpi].window
        assert v.window_start_ms % (v.window_size_s * 1000) == 0
        assert v.device_group in ("treatment", "control")
        assert v.sample_count == want[k][1]
        assert v.revision >= 1


def test_every_kind_is_computed() -> None:
    values = [12.0, 7.5, 30.25, 0.0]
    store = fold([batch("t-1", [Reading(i, T0 + i * 1000, {"no2": v}) for i, v in enumerate(values)])])
    got = store.values()
    assert got[key("no2_mean", "treatment", 60, T0)] == (pytest.approx(statistics.fmean(values)), 4)
    assert got[key("no2_sum", "treatment", 60, T0)] == (math.fsum(values), 4)
    assert got[key("no2_min", "treatment", 60, T0)] == (0.0, 4)
    assert got[key("no2_max", "treatment", 60, T0)] == (30.25, 4)
    assert got[key("no2_count", "treatment", 60, T0)] == (4.0, 4)


def test_groups_are_kept_apart() -> None:
    store = fold(
        [
            batch("t-1", [Reading(1, T0 + 1000, {"no2": 10.0})]),
            batch("t-2", [Reading(1, T0 + 2000, {"no2": 30.0})]),
            batch("c-1", [Reading(1, T0 + 3000, {"no2": 100.0})]),
        ]
    )
    values = store.values()
    assert values[key("no2_mean", "treatment", 60, T0)] == (20.0, 2)
    assert values[key("no2_mean", "control", 60, T0)] == (100.0, 1)
    assert values[key("no2_count", "treatment", 60, T0)] == (2.0, 2)
    assert values[key("no2_count", "control", 60, T0)] == (1.0, 1)


def test_windows_are_kept_apart() -> None:
    store = fold(
        [batch("t-1", [Reading(1, T0 + 59_999, {"no2": 1.0}), Reading(2, T0 + 60_000, {"no2": 3.0})])]
    )
    values = store.values()
    assert values[key("no2_sum", "treatment", 60, T0)] == (1.0, 1)
    assert values[key("no2_sum", "treatment", 60, T0 + 60_000)] == (3.0, 1)


def test_experiments_with_shared_window_sizes_are_kept_apart() -> None:
    other = EXPERIMENT.model_copy(update={"id": "engine-test-2"})
    store = Store()
    store.apply(batch("t-1", [Reading(1, T0, {"no2": 5.0})]))
    store.apply(ReadingBatch(other.id, "t-1", "treatment", T0, (Reading(1, T0, {"no2": 50.0}),)), other)
    assert store.values()[key("no2_max", "treatment", 60, T0)] == (5.0, 1)
    assert store.values()[key("no2_max", "treatment", 60, T0, other.id)] == (50.0, 1)


def test_readings_lacking_a_kpi_metric_are_ignored() -> None:
    store = Store()
    out = store.apply(batch("t-1", [Reading(1, T0, {"temperature": 10.0}), Reading(2, T0, {"lat": 45.0})]))
    assert out == []
    assert dict(store) == {}
    assert store.stores == []

    store = fold(
        [batch("t-1", [Reading(1, T0, {"pm25": 10.0}), Reading(2, T0 + 1, {"no2": 7.0, "noise": 1.0})])]
    )
    values = store.values()
    assert values[key("pm25_hourly", "treatment", 3600, T0)] == (10.0, 1)  # the no2 reading adds nothing here
    assert values[key("no2_count", "treatment", 60, T0)] == (1.0, 1)  # the pm25 reading adds nothing here
    assert values[key("noise_5m_max", "treatment", 300, T0)] == (1.0, 1)
    assert key("pm25_hourly", "treatment", 60, T0) not in values


def test_empty_batch_touches_nothing() -> None:
    store = Store()
    assert store.apply(batch("t-1", [])) == []
    assert store.loads == store.stores == []


def test_each_stored_window_is_loaded_and_stored_once_per_batch() -> None:
    readings = [Reading(i, T0 + i * 1000, {"no2": float(i), "pm25": 1.0}) for i in range(30)]
    store = Store()
    out = store.apply(batch("t-1", readings))
    assert len(store.loads) == len(set(store.loads))
    assert sorted(store.loads) == sorted(store.stores)
    assert {v.kpi for v in out} == {
        "no2_mean",
        "no2_sum",
        "no2_min",
        "no2_max",
        "no2_count",
        "pm25_hourly",
        "pm25_hourly_total",
    }
    assert {v.sample_count for v in out} == {30}
    assert {v.revision for v in out} == {1}


def test_revisions_increase_by_one_per_batch_touching_a_window() -> None:
    store = Store()
    k_minute = key("no2_count", "treatment", 60, T0)
    k_next_minute = key("no2_count", "treatment", 60, T0 + 60_000)
    k_hour = key("pm25_hourly", "treatment", 3600, T0)
    k_control = key("no2_count", "control", 60, T0)
    steps = [
        (batch("t-1", [Reading(1, T0 + 1, {"no2": 1.0}), Reading(2, T0 + 2, {"no2": 2.0})]), {k_minute: 1}),
        (batch("t-2", [Reading(1, T0 + 3, {"no2": 3.0, "pm25": 1.0})]), {k_minute: 2, k_hour: 1}),
        (batch("t-1", [Reading(3, T0 + 60_001, {"no2": 1.0})]), {k_next_minute: 1}),
        (batch("c-1", [Reading(1, T0 + 5, {"no2": 1.0})]), {k_control: 1}),
        (
            batch("t-1", [Reading(4, T0 + 7, {"pm25": 3.0}), Reading(5, T0 + 61_000, {"pm25": 2.0})]),
            {k_hour: 2},
        ),
        (batch("t-2", [Reading(6, T0 + 8, {"no2": 4.0})]), {k_minute: 3}),
    ]
    for b, expected in steps:
        before = store.revisions()
        out = store.apply(b)
        returned = {v.key(): v.revision for v in out}
        assert set(returned) == windows_touched(b)  # exactly the touched KPI windows, each once
        assert len(out) == len(returned)
        for k, r in expected.items():
            assert returned[k] == r, k
        for k, r in returned.items():
            assert r == before.get(k, 0) + 1, k
    assert store.values()[k_minute] == (4.0, 4)
    assert store.values()[k_hour] == (pytest.approx(2.0), 3)


def test_stored_state_survives_a_json_round_trip() -> None:
    """The Store helper round-trips every value through JSON: a Faust changelog replay."""
    readings = sample_readings()
    store = fold(batches_of(readings, 4))
    assert_same_values(store.values(), recompute(readings))
    for state in dict(store).values():
        assert json.loads(json.dumps(state)) == state


def test_example_manifest_lez_san_salvario() -> None:
    exp = load_manifest(ROOT / "control" / "examples" / "experiments" / "lez-san-salvario.yaml")
    readings = [
        Reading(i, T0 + i * 20_000, {"no2": 20.0 + i, **({"pm25": 8.0 + i} if i % 2 else {})})
        for i in range(12)
    ]
    store = Store()
    for dev, chunk in (("aq-lez-01", readings[:5]), ("aq-lez-02", readings[5:]), ("aq-ctl-01", readings[:3])):
        store.apply(ReadingBatch(exp.id, dev, exp.device(dev).group, T0, tuple(chunk)), exp)
    got = {k: v for k, (v, _) in store.values().items()}
    # minute 0 (treatment): readings 0, 1, 2 → no2 20, 21, 22
    assert got[key("no2_mean", "treatment", 60, T0, exp.id)] == pytest.approx(21.0)
    assert got[key("no2_min", "treatment", 60, T0, exp.id)] == 20.0
    assert got[key("no2_max", "treatment", 60, T0, exp.id)] == 22.0
    assert got[key("no2_samples", "treatment", 60, T0, exp.id)] == 3.0
    # the hour (treatment): pm25 on odd readings 1..11 → 9, 11, ..., 19
    assert got[key("pm25_hourly_mean", "treatment", 3600, T0, exp.id)] == pytest.approx(14.0)
    # control saw readings 0..2: pm25 only on reading 1
    assert got[key("pm25_hourly_mean", "control", 3600, T0, exp.id)] == 9.0
    assert got[key("no2_samples", "control", 60, T0, exp.id)] == 3.0
    by_device = {"aq-lez-01": readings[:5], "aq-lez-02": readings[5:], "aq-ctl-01": readings[:3]}
    group_of = {d.id: d.group for d in exp.devices}
    want = defaultdict(list)
    for dev, rs in by_device.items():
        for r in rs:
            want[(group_of[dev], window_start(r.ts_ms, 60))].append(r.metrics["no2"])
    for (group, start), vs in want.items():
        assert got[key("no2_mean", group, 60, start, exp.id)] == pytest.approx(statistics.fmean(vs))


# --- order and partition do not matter -------------------------------------------------------------

_READING = st.tuples(
    st.sampled_from(sorted(GROUP_OF)),
    st.integers(min_value=T0 - 2 * 3_600_000, max_value=T0 + 2 * 3_600_000),
    st.fixed_dictionaries(
        {},
        optional={
            "no2": st.floats(min_value=0, max_value=2000),
            "pm25": st.floats(min_value=0, max_value=1000),
            "noise": st.floats(min_value=0, max_value=194),
            "temperature": st.floats(min_value=-60, max_value=70),
        },
    ),
)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(_READING, min_size=1, max_size=60),
    st.permutations(range(60)),
    st.lists(st.integers(min_value=1, max_value=10), min_size=1, max_size=60),
)
def test_any_order_and_partition_gives_the_same_values(raw, order, cuts) -> None:
    readings = [(d, Reading(i, ts, m)) for i, (d, ts, m) in enumerate(raw)]
    want = recompute(readings)
    one_by_one = fold([batch(d, [r]) for d, r in readings])
    assert_same_values(one_by_one.values(), want)
    # one batch per reading: the revision is the sample count
    assert one_by_one.revisions() == {k: n for k, (_, n) in want.items()}

    shuffled = [readings[i] for i in order if i < len(readings)]
    batches, pos = [], 0
    for size in [*cuts, len(shuffled)]:
        if pos >= len(shuffled):
            break
        batches.extend(batches_of(shuffled[pos : pos + size], size))
        pos += size
    store = fold(batches)
    assert_same_values(store.values(), want)
    # each KPI window's revision is the number of batches that touched it
    touched: dict[tuple, int] = defaultdict(int)
    for b in batches:
        for k in windows_touched(b):
            touched[k] += 1
    assert store.revisions() == dict(touched)


# --- screen: de-duplication before the fold ------------------------------------------------------

HORIZON_MS = 3_600_000


def test_screen_passes_new_readings_and_drops_a_redelivery() -> None:
    b = batch("t-1", [Reading(1, T0, {"no2": 1.0}), Reading(2, T0 + 1000, {"no2": 2.0, "pm25": 3.0})])
    first, seen = screen(b, None, HORIZON_MS)
    assert first.fresh == b
    assert first.duplicates == 0 and first.too_late == ()
    again, seen2 = screen(b, json.loads(json.dumps(seen)), HORIZON_MS)  # state from a changelog
    assert again.fresh.readings == ()
    assert again.duplicates == 3
    assert again.too_late == ()
    assert (again.fresh.experiment_id, again.fresh.device_id, again.fresh.group) == (
        b.experiment_id,
        "t-1",
        b.group,
    )
    assert seen2 == json.loads(json.dumps(seen2))


def test_screen_reads_the_earlier_state_form_from_an_older_changelog() -> None:
    old = {"hwm": T0, "seen": {str(T0): ["no2"], str(T0 - 1000): ["no2", "pm25"]}}
    out, state = screen(batch("t-1", [Reading(1, T0 - 1000, {"pm25": 1.0, "noise": 2.0})]), old, HORIZON_MS)
    assert out.fresh.readings == (Reading(1, T0 - 1000, {"noise": 2.0}),) and out.duplicates == 1
    assert state["t"] == [T0 - 1000, T0] and "seen" not in state


def test_screen_keeps_only_the_new_metrics_of_a_known_instant() -> None:
    _, seen = screen(batch("t-1", [Reading(1, T0, {"no2": 1.0})]), None, HORIZON_MS)
    out, _ = screen(batch("t-1", [Reading(1, T0, {"no2": 1.0, "pm25": 2.0})]), seen, HORIZON_MS)
    assert out.fresh.readings == (Reading(1, T0, {"pm25": 2.0}),)
    assert out.duplicates == 1


def test_screen_holds_back_readings_beyond_the_horizon() -> None:
    _, seen = screen(batch("t-1", [Reading(1, T0, {"no2": 1.0})]), None, HORIZON_MS)
    late = Reading(2, T0 - HORIZON_MS, {"no2": 5.0})
    in_time = Reading(3, T0 - HORIZON_MS + 1, {"no2": 6.0})
    out, seen = screen(batch("t-1", [late, in_time]), seen, HORIZON_MS)
    assert out.too_late == (late,)
    assert out.fresh.readings == (in_time,)
    # the seen set is pruned to the horizon
    _, seen = screen(batch("t-1", [Reading(4, T0 + 10 * HORIZON_MS, {"no2": 1.0})]), seen, HORIZON_MS)
    assert seen["t"] == [T0 + 10 * HORIZON_MS]


def test_screen_remembers_a_bounded_number_of_instants_and_holds_back_what_it_forgot() -> None:
    seen = None
    for i in range(100):  # a fast device: 100 instants, one second apart
        _, seen = screen(batch("t-1", [Reading(i, T0 + i * 1000, {"no2": 1.0})]), seen, HORIZON_MS, memory=16)
        assert len(seen["t"]) <= 16 + 4
    oldest_kept = seen["t"][0]
    assert seen["floor"] == oldest_kept - 1000  # the newest instant it forgot
    out, seen = screen(
        batch("t-1", [Reading(1, seen["floor"], {"no2": 1.0}), Reading(2, oldest_kept, {"no2": 1.0})]),
        seen,
        HORIZON_MS,
        memory=16,
    )
    assert [r.ts_ms for r in out.too_late] == [seen["floor"]]  # cannot be told from a duplicate
    assert out.fresh.readings == () and out.duplicates == 1  # still remembered: a duplicate
    between = T0 + 95_500  # never seen, newer than anything forgotten: counted
    out, _ = screen(batch("t-1", [Reading(3, between, {"no2": 1.0})]), seen, HORIZON_MS, memory=16)
    assert [r.ts_ms for r in out.fresh.readings] == [between]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(sorted(GROUP_OF)), st.integers(min_value=0, max_value=600)),
        min_size=1,
        max_size=40,
        unique=True,
    ),
    st.lists(st.integers(min_value=0, max_value=39), max_size=20),
)
def test_screened_redeliveries_do_not_change_the_kpis(raw, redelivered) -> None:
    readings = [
        (d, Reading(i, T0 + s * 1000, {"no2": float(s % 97), "pm25": 1.0})) for i, (d, s) in enumerate(raw)
    ]
    batches = [batch(d, [r]) for d, r in readings]
    with_repeats = list(batches)
    for i in redelivered:
        if i < len(batches):
            with_repeats.insert(min(len(with_repeats), i + 3), batches[i])  # at-least-once: a later repeat
    store = Store()
    seen: dict[str, dict] = {}
    for b in with_repeats:
        screened, seen[b.device_id] = screen(b, seen.get(b.device_id), 24 * HORIZON_MS)
        store.apply(screened.fresh)
    assert_same_values(store.values(), recompute(readings))


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 30), st.sets(st.sampled_from(["no2", "pm25", "noise"]), min_size=1)),
        max_size=60,
    ),
    st.integers(1, 5),
)
def test_screen_passes_exactly_the_unseen_device_metric_instants(stream, per_message) -> None:
    """Against a plain set of (metric, ts) seen: within the horizon and memory, what passes is
    exactly what was not seen before, whatever the order and the metric sets."""
    seen, state = set(), None
    for start in range(0, len(stream), per_message):
        part = stream[start : start + per_message]
        readings = [Reading(i, T0 + s * 1000, dict.fromkeys(sorted(ms), 1.0)) for i, (s, ms) in enumerate(part)]
        out, state = screen(batch("t-1", readings), state, HORIZON_MS)
        state = json.loads(json.dumps(state))
        passed = [(m, r.ts_ms) for r in out.fresh.readings for m in r.metrics]
        want = []
        for r in readings:
            for m in r.metrics:
                if (m, r.ts_ms) not in seen:
                    seen.add((m, r.ts_ms))
                    want.append((m, r.ts_ms))
        assert sorted(passed) == sorted(want)
        assert out.too_late == ()


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(-5, 40),  # the message's first instant (s), often right after the previous one
            st.lists(st.tuples(st.integers(0, 3), st.sets(st.sampled_from(["no2", "pm25"]), min_size=1)), max_size=6),
        ),
        max_size=30,
    ),
    st.integers(2, 12),
)
def test_screen_of_all_new_readings_is_its_plain_loop(messages, memory) -> None:
    """The shortcut for a message of readings all newer than anything remembered (``all_new``)
    leaves the very state and output of the reading-by-reading loop, whatever the steps,
    orders, metric sets and memory."""
    fast_state = plain_state = None
    last = 0
    for first, steps in messages:
        t, readings = last + first, []
        for i, (step_s, metrics) in enumerate(steps):
            t += step_s
            readings.append(Reading(i, T0 + t * 1000, dict.fromkeys(sorted(metrics), 1.0)))
        last = t
        b = batch("t-1", readings)
        fast, fast_state = screen(b, fast_state, 20_000, memory)
        with mock.patch("streams.engine.all_new", return_value=False):
            plain, plain_state = screen(b, plain_state, 20_000, memory)
        assert fast == plain
        assert repr(fast_state) == repr(plain_state)
