"""KPI aggregators against the standard library, on plain lists of floats."""

from __future__ import annotations

import json
import math
import statistics
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.aggregators import AGGREGATORS, Count, Max, Mean, Min, Sum, aggregate

EPS = sys.float_info.epsilon
KINDS = ("count", "sum", "mean", "min", "max")


def reference(kind: str, values: list[float]) -> float | None:
    if kind == "count":
        return float(len(values))
    if kind == "sum":
        return math.fsum(values)
    if not values:
        return None
    return {"mean": statistics.fmean, "min": min, "max": max}[kind](values)


def assert_close(kind: str, got: float | None, values: list[float]) -> None:
    want = reference(kind, values)
    if want is None:
        assert got is None
        return
    assert got is not None
    if kind in ("count", "min", "max"):
        assert got == want
    elif kind == "sum":
        # Kahan's bound: |error| <= 2·eps·Σ|x| (+ O(n·eps²)·Σ|x|), against the exact fsum
        bound = (2 * EPS + len(values) * EPS * EPS) * math.fsum(abs(v) for v in values)
        assert abs(got - want) <= bound * 1.01 + 1e-300
    else:
        scale = max(abs(v) for v in values)
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12 * scale)


def test_registry_of_kinds() -> None:
    assert set(AGGREGATORS) == set(KINDS)
    assert {"count": Count, "sum": Sum, "mean": Mean, "min": Min, "max": Max} == AGGREGATORS
    for kind, agg in AGGREGATORS.items():
        assert agg.kind == kind


def test_unknown_kind() -> None:
    with pytest.raises(KeyError):
        aggregate("median", [1.0])


CASES = [
    pytest.param([1.0], id="one"),
    pytest.param([1.0, 2.0, 3.0, 4.0], id="small"),
    pytest.param([-5.5, 3.25, 0.0, -0.0, 7.75], id="signs-and-zeros"),
    pytest.param([0.1] * 10, id="tenths"),
    pytest.param([1e16, 1.0, -1e16], id="cancellation"),
    pytest.param([1.0] + [1e-16] * 1000, id="tiny-addends"),
    pytest.param([3.0] * 1000, id="constant"),
    pytest.param([float(i) for i in range(1, 1001)], id="1-to-1000"),
    pytest.param([1e-300, 2e-300, 3e-300], id="subnormal-ish"),
    pytest.param([1e300, 1e300, -1e300], id="huge"),
    pytest.param([20000.0, 0.0, 19999.5, 0.5], id="metric-range"),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("values", CASES)
def test_against_stdlib_table(kind: str, values: list[float]) -> None:
    assert_close(kind, aggregate(kind, values), values)


@pytest.mark.parametrize(
    ("kind", "values", "expected"),
    [
        ("count", [5.0, 5.0, 5.0], 3.0),
        ("sum", [0.1] * 10, 1.0),  # Kahan recovers what naive summation loses
        ("sum", [1.0, 1e100, 1.0, -1e100], 0.0),  # ...but it is not fsum (which gives 2.0)
        ("mean", [1.0, 2.0], 1.5),
        ("mean", [3.0] * 1000, 3.0),
        ("min", [3.0, -1.0, 2.0], -1.0),
        ("max", [3.0, -1.0, 2.0], 3.0),
        ("min", [0.0, -0.0], 0.0),
    ],
)
def test_exact_results(kind: str, values: list[float], expected: float) -> None:
    assert aggregate(kind, values) == expected


def test_naive_sum_loses_what_kahan_keeps() -> None:
    values = [0.1] * 10
    assert sum(values) != 1.0
    assert aggregate("sum", values) == 1.0 == math.fsum(values)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [("count", 0.0), ("sum", 0.0), ("mean", None), ("min", None), ("max", None)],
)
def test_empty_input(kind: str, expected: float | None) -> None:
    # count and sum of nothing are 0.0, as len()/math.fsum() say; the others have no value
    result = aggregate(kind, [])
    assert result == expected
    assert result is None if expected is None else type(result) is float
    assert AGGREGATORS[kind].result(AGGREGATORS[kind].initialize()) == expected


@pytest.mark.parametrize("kind", KINDS)
def test_count_results_are_floats(kind: str) -> None:
    assert type(aggregate(kind, [1.0, 2.0])) is float


@pytest.mark.parametrize("kind", KINDS)
def test_add_does_not_mutate_state(kind: str) -> None:
    agg = AGGREGATORS[kind]
    state = agg.initialize()
    snapshot = json.dumps(state)
    agg.add(state, 4.0)
    assert json.dumps(state) == snapshot
    assert agg.initialize() is not agg.initialize()  # no shared mutable default


FINITE = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12)
VALUES = st.lists(FINITE, max_size=200)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(KINDS), VALUES)
def test_against_stdlib_property(kind: str, values: list[float]) -> None:
    assert_close(kind, aggregate(kind, values), values)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=20000), min_size=1, max_size=300))
def test_mean_within_min_and_max(values: list[float]) -> None:
    mean = aggregate("mean", values)
    assert min(values) <= mean <= max(values)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(KINDS), VALUES, VALUES)
def test_state_json_round_trip(kind: str, head: list[float], tail: list[float]) -> None:
    """States live in Faust changelogs as JSON: a round trip mid-stream changes nothing."""
    agg = AGGREGATORS[kind]
    state = agg.initialize()
    for v in head:
        state = agg.add(state, v)
    restored = json.loads(json.dumps(state))
    assert restored == state
    assert agg.result(restored) == agg.result(state)
    for v in tail:
        state = agg.add(state, v)
        restored = agg.add(restored, v)
    assert agg.result(restored) == agg.result(state) == aggregate(kind, head + tail)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(KINDS), VALUES, st.randoms(use_true_random=False))
def test_order_independence(kind: str, values: list[float], rnd) -> None:
    shuffled = list(values)
    rnd.shuffle(shuffled)
    a, b = aggregate(kind, values), aggregate(kind, shuffled)
    if kind in ("count", "min", "max") or not values:
        assert a == b
    else:
        assert_close(kind, a, values)
        assert_close(kind, b, values)


def fold(kind: str, values: list[float]) -> list:
    agg = AGGREGATORS[kind]
    state = agg.initialize()
    for v in values:
        state = agg.add(state, v)
    return state


@pytest.mark.parametrize(
    ("kind", "head", "tail", "expected"),
    [
        ("count", [1.0, 2.0], [3.0], 3.0),
        ("count", [], [], 0.0),
        ("sum", [0.1] * 5, [0.1] * 5, 1.0),  # the compensation of both halves is kept
        ("mean", [1.0, 2.0], [6.0], 3.0),
        ("mean", [], [4.0], 4.0),
        ("mean", [4.0], [], 4.0),
        ("mean", [], [], None),
        ("min", [3.0], [-1.0, 2.0], -1.0),
        ("min", [], [], None),
        ("max", [3.0], [], 3.0),
        ("max", [], [5.0], 5.0),
    ],
)
def test_merge_table(kind: str, head: list[float], tail: list[float], expected: float | None) -> None:
    agg = AGGREGATORS[kind]
    assert agg.result(agg.merge(fold(kind, head), fold(kind, tail))) == expected


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(KINDS), VALUES, VALUES)
def test_merge_equals_one_fold(kind: str, head: list[float], tail: list[float]) -> None:
    """Two windows' states merged give the state of both windows' values (to rounding)."""
    agg = AGGREGATORS[kind]
    a, b = fold(kind, head), fold(kind, tail)
    merged = agg.merge(a, b)
    assert (a, b) == (fold(kind, head), fold(kind, tail))  # neither input changed
    assert_close(kind, agg.result(merged), head + tail)
    assert_close(kind, agg.result(agg.merge(b, a)), head + tail)
    assert_close(kind, agg.result(agg.merge(agg.initialize(), merged)), head + tail)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(KINDS), VALUES, VALUES)
def test_add_all_is_the_fold_of_add(kind: str, head: list[float], tail: list[float]) -> None:
    """``add_all`` (a message's values at once, as the worker adds them) gives the very state
    of ``add`` one value at a time, to the last bit (repr tells -0.0 from 0.0), from any
    state, and leaves its input alone."""
    agg = AGGREGATORS[kind]
    state = fold(kind, head)
    snapshot = repr(state)
    one_by_one = state
    for v in tail:
        one_by_one = agg.add(one_by_one, v)
    assert repr(agg.add_all(state, tail)) == repr(one_by_one)
    assert repr(state) == snapshot


@pytest.mark.parametrize(
    ("kind", "values", "expected"),
    [
        ("count", [1.0, 2.0, 3.0], [3]),
        ("sum", [0.5, 0.25, 0.25], [1.0, 0.0]),
        ("mean", [1.0, 2.0, 6.0], [3, 3.0]),
        ("min", [3.0, -1.0, 2.0], [-1.0]),
        ("max", [3.0, -1.0, 5.0], [5.0]),
        ("min", [], [None]),
    ],
)
def test_add_all_cases(kind: str, values: list[float], expected: list) -> None:
    agg = AGGREGATORS[kind]
    assert agg.add_all(agg.initialize(), values) == expected


def test_add_all_sum_keeps_the_compensation() -> None:
    state = Sum.add_all(Sum.initialize(), [0.1] * 10)
    assert Sum.result(state) == 1.0 == math.fsum([0.1] * 10)
    assert state[1] != 0.0  # the rounding of the last step, carried to the next message
