"""Every KPI kind as a pure aggregator: table-driven cases and hypothesis against
numpy/statistics, order independence, the sketch's stated error bound, and the impact
estimator's coverage on data with a known effect."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pilotlab.contracts import to_ms
from pilotlab.manifest import Experiment, Kpi
from streams import kpis
from streams.kpis import SKETCH_ALPHA, Obs

EXP = Experiment.model_validate(
    {
        "id": "kinds",
        "title": "t",
        "startup": "s",
        "district": "d",
        "location": {"lat": 45.0, "lon": 7.6},
        "periods": {
            "baseline": {"start": "2026-03-02T00:00:00Z", "end": "2026-03-09T00:00:00Z"},
            "intervention": {"start": "2026-03-09T00:00:00Z", "end": "2026-03-16T00:00:00Z"},
        },
        "devices": [
            {"id": "t1", "kind": "air_quality", "group": "treatment", "interval": "1m"},
            {"id": "t2", "kind": "air_quality", "group": "treatment", "interval": "5m"},
            {"id": "c1", "kind": "air_quality", "group": "control", "interval": "1m"},
        ],
        "kpis": [{"name": "x", "metric": "pm25", "kind": "mean"}],
    }
)
T0 = to_ms(EXP.periods.baseline.start)
T_INT = to_ms(EXP.periods.intervention.start)


def kpi(kind: str, **kw) -> Kpi:
    return Kpi(name="k", metric="pm25", kind=kind, **kw)


def fold(kind_kpi: Kpi, obs: list[Obs], group: str = "treatment"):
    agg = kpis.make(kind_kpi, EXP)
    state = agg.initialize()
    for o in obs:
        state = agg.add(state, o)
        state = json.loads(json.dumps(state))  # states live in a JSON changelog
    return agg.result(state, group)


def ob(value: float, device: str = "t1", ts: int = T0, received: int | None = None, group: str = "treatment"):
    return Obs(value, ts, device, group, ts if received is None else received)


def rank_value(values: list[float], q: float) -> float:
    """The sample DDSketch's quantile approximates: rank ⌊q·(n−1)⌋ of the sorted values."""
    return sorted(values)[math.floor(q * (len(values) - 1))]


# --- table-driven ----------------------------------------------------------------------------

CASES = [
    ("count", {}, [1, 2, 3], 3.0),
    ("sum", {}, [1.5, 2.5, 3], 7.0),
    ("mean", {}, [1, 2, 3, 4], 2.5),
    ("min", {}, [4, -1, 3], -1.0),
    ("max", {}, [4, -1, 3], 4.0),
    ("exceedance", {"threshold": 25.0}, [10, 25, 26, 40], 0.5),  # strictly above
    ("exceedance", {"threshold": 25.0}, [1, 2], 0.0),
    ("quantile", {"q": 0.5}, [7.0], 7.0),
]


@pytest.mark.parametrize(("kind", "params", "values", "want"), CASES)
def test_kinds_table(kind, params, values, want) -> None:
    value, _ = fold(kpi(kind, **params), [ob(float(v)) for v in values])
    assert value == pytest.approx(want, rel=SKETCH_ALPHA if kind == "quantile" else 1e-12)


def test_exceedance_details() -> None:
    value, details = fold(kpi("exceedance", threshold=25), [ob(30.0), ob(20.0), ob(26.0)])
    assert value == pytest.approx(2 / 3)
    assert details == {"above": 2, "samples": 3, "threshold": 25.0}


def test_availability_counts_distinct_reporting_devices_of_the_group() -> None:
    value, details = fold(kpi("availability"), [ob(1.0, "t1"), ob(2.0, "t1"), ob(3.0, "t1")])
    assert (value, details) == (0.5, {"reporting": 1, "registered": 2})
    value, _ = fold(kpi("availability"), [ob(1.0, "t1"), ob(2.0, "t2")])
    assert value == 1.0
    value, details = fold(kpi("availability"), [ob(1.0, "c1", group="control")], group="control")
    assert (value, details["registered"]) == (1.0, 1)


def test_completeness_uses_the_declared_intervals() -> None:
    # a 10-minute window: t1 (1m) is expected 10 times, t2 (5m) twice → 12 expected
    k = kpi("completeness", window="10m")
    value, details = fold(k, [ob(1.0, "t1")] * 6)
    assert details == {"received": 6, "expected": 12.0}
    assert value == 0.5


def test_freshness_is_the_p95_delay_in_seconds() -> None:
    delays = list(range(1, 101))  # seconds
    obs = [ob(1.0, ts=T0, received=T0 + d * 1000) for d in delays]
    value, _ = fold(kpi("freshness"), obs)
    want = rank_value([float(d) for d in delays], 0.95)
    assert abs(value - want) <= SKETCH_ALPHA * want
    # a device clock ahead of ingest counts as no delay, not a negative one
    value, _ = fold(kpi("freshness"), [ob(1.0, ts=T0 + 5000, received=T0)])
    assert value == 0.0


def test_manifest_parameters_are_checked() -> None:
    with pytest.raises(ValueError, match="needs q"):
        kpi("quantile")
    with pytest.raises(ValueError, match="needs threshold"):
        kpi("exceedance")
    with pytest.raises(ValueError, match="quantile KPIs only"):
        kpi("mean", q=0.5)
    with pytest.raises(ValueError, match="exceedance KPIs only"):
        kpi("max", threshold=3)
    assert kpi("quantile", q=0.95).signature() != kpi("quantile", q=0.5).signature()


# --- hypothesis against numpy / statistics ----------------------------------------------------

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(st.lists(finite, min_size=1, max_size=300), st.sampled_from([0.05, 0.5, 0.95, 0.99]))
def test_quantile_within_the_stated_bound(values, q) -> None:
    value, details = fold(kpi("quantile", q=q), [ob(v) for v in values])
    want = rank_value(values, q)
    # DDSketch: relative error ≤ α; values too close to 0 for the mapping land in the zero bucket
    assert abs(value - want) <= SKETCH_ALPHA * abs(want) + 1e-300 or abs(want) < 1e-300
    assert details["relative_accuracy"] == SKETCH_ALPHA
    state = kpis.sketch_new()
    for v in values:
        state = kpis.sketch_add(state, v)
    assert kpis.sketch_quantile(state, q) == pytest.approx(kpis.sketch_quantile_reference(state, q), rel=1e-12)


@settings(max_examples=200, deadline=None)
@given(st.lists(finite, min_size=1, max_size=200), finite)
def test_exceedance_against_numpy(values, threshold) -> None:
    value, _ = fold(kpi("exceedance", threshold=threshold), [ob(v) for v in values])
    assert value == pytest.approx(float(np.mean(np.array(values) > threshold)), abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(st.lists(finite, min_size=2, max_size=200), st.randoms(use_true_random=False))
def test_results_do_not_depend_on_order(values, rnd) -> None:
    shuffled = list(values)
    rnd.shuffle(shuffled)
    for k in (kpi("quantile", q=0.95), kpi("exceedance", threshold=0.0), kpi("availability"), kpi("min")):
        assert fold(k, [ob(v) for v in values]) == fold(k, [ob(v) for v in shuffled])
    a = fold(kpi("impact"), [ob(v, ts=T0 + i) for i, v in enumerate(values)])
    b = fold(kpi("impact"), [ob(v, ts=T0 + i) for i, v in enumerate(shuffled)])
    assert a[1]["readings"] == b[1]["readings"]
    assert a[1]["mean"]["treatment"]["baseline"] == pytest.approx(b[1]["mean"]["treatment"]["baseline"])


@settings(max_examples=100, deadline=None)
@given(st.lists(finite, min_size=1, max_size=100), st.lists(finite, min_size=1, max_size=100))
def test_sketch_merge_equals_one_sketch(a, b) -> None:
    sa = sb = kpis.sketch_new()
    for x in a:
        sa = kpis.sketch_add(sa, x)
    for x in b:
        sb = kpis.sketch_add(sb, x)
    one = kpis.sketch_new()
    for x in a + b:
        one = kpis.sketch_add(one, x)
    assert kpis.sketch_merge(sa, sb) == one
    assert kpis.sketch_count(one) == len(a) + len(b)


# --- impact: see tests/unit/test_impact.py ------------------------------------------------------


def test_impact_kind_is_the_impact_module() -> None:
    """The impact kind folds observations into streams.impact's state and returns its result."""
    data = [ob(10.0, "t1", T0), ob(12.0, "t1", T_INT), ob(20.0, "c1", T0, group="control"),
            ob(20.0, "c1", T_INT, group="control")]  # fmt: skip
    value, details = fold(kpi("impact"), data)
    assert value == pytest.approx(0.2)
    assert details["devices"] == {"treatment": 1, "control": 1}
    assert details["verdict"] == "inconclusive"
    assert "no_replication" in details["warnings"] and details["ci_low"] is None


# --- one registry: pilotlab.kpi_kinds names the kinds, streams.kpis.REGISTRY computes them ---------

from typing import get_args  # noqa: E402

from pilotlab import kpi_kinds  # noqa: E402
from pilotlab.manifest import Kpi as ManifestKpi  # noqa: E402

PARAMS_OF = {"quantile": {"q": 0.5}, "exceedance": {"threshold": 25.0}}


def test_every_registered_kind_has_exactly_one_aggregator() -> None:
    assert list(kpis.REGISTRY) == list(kpi_kinds.KINDS)  # same names, same order, each once
    assert get_args(ManifestKpi.model_fields["kind"].annotation) == kpi_kinds.KIND_NAMES
    for name in kpi_kinds.KINDS:
        agg = kpis.make(kpi(name, **PARAMS_OF.get(name, {})), EXP)
        for method in ("initialize", "add", "merge", "result"):
            assert callable(getattr(agg, method)), (name, method)
    with pytest.raises(ValueError, match="already has an aggregator"):
        kpis.register("mean", lambda k, e: kpis.OfValue(kpis.AGGREGATORS["mean"]))
    with pytest.raises(ValueError, match="not a KPI kind"):
        kpis.register("median", lambda k, e: kpis.OfValue(kpis.AGGREGATORS["mean"]))
    assert list(kpis.REGISTRY) == list(kpi_kinds.KINDS)


def test_the_manifest_checks_parameters_from_the_registry() -> None:
    assert set(kpi_kinds.PARAMS) <= set(ManifestKpi.model_fields)
    for name, spec in kpi_kinds.KINDS.items():
        required = {p.name: float(p.example) for p in spec.params if p.required}
        k = kpi(name, **required)
        assert k.signature() == ":".join([name, *(repr(v) for v in required.values())])
        for p in kpi_kinds.PARAMS:
            if spec.param(p) is None:
                with pytest.raises(ValueError, match=f"{p} applies to .* KPIs only, not {name}"):
                    kpi(name, **required, **{p: 0.5})
        for p in required:
            with pytest.raises(ValueError, match=f"needs {p}, e.g. {p}: "):
                kpi(name, **{q: v for q, v in required.items() if q != p})


def test_only_the_impact_kind_spans_the_experiment() -> None:
    assert [n for n, k in kpi_kinds.KINDS.items() if not k.windowed] == ["impact"]
    assert [n for n, k in kpi_kinds.KINDS.items() if k.period_fold is None] == ["impact"]
    assert all(k.pooled is not None for k in kpi_kinds.KINDS.values() if k.period_fold == "pooled")


DEVICES = [("t1", "treatment"), ("t2", "treatment"), ("c1", "control")]
SPAN_MS = T_INT - T0


def observations(values: list[float], offsets: list[int]) -> list[Obs]:
    """Plain lists of values and time offsets → observations of the three devices, over both periods."""
    out = []
    for i, (v, off) in enumerate(zip(values, offsets, strict=False)):
        device, group = DEVICES[i % 3]
        ts = T0 + off % (2 * SPAN_MS)
        out.append(Obs(v, ts, device, group, ts + (off % 7000)))
    return out


def _state(k: Kpi, obs: list[Obs]):
    agg = kpis.make(k, EXP)
    state = agg.initialize()
    for o in obs:
        state = agg.add(state, o)
    return json.loads(json.dumps(state))


def _close(got: float | None, want: float | None, rel: float) -> None:
    assert (got is None) == (want is None)
    if got is not None:
        assert got == pytest.approx(want, rel=rel, abs=1e-6)


def _same(name: str, got, want) -> None:
    (gv, gd), (wv, wd) = got, want
    if name == "impact":
        assert gd["readings"] == wd["readings"] and gd["devices"] == wd["devices"]
        assert gd["verdict"] == wd["verdict"] and gd["warnings"] == wd["warnings"]
        for g in gd["mean"]:
            for p in gd["mean"][g]:
                _close(gd["mean"][g][p], wd["mean"][g][p], 1e-9)
        _close(gv, wv, 1e-6)
    elif name in ("sum", "mean"):
        _close(gv, wv, 1e-9)
        assert gd == wd
    else:
        assert (gv, gd) == (wv, wd)


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(kpi_kinds.KIND_NAMES),
    st.lists(st.tuples(finite, st.integers(min_value=0, max_value=10**12)), max_size=60),
    st.lists(st.tuples(finite, st.integers(min_value=0, max_value=10**12)), max_size=60),
)
def test_merge_of_two_states_equals_one_fold(name, head, tail) -> None:
    """Every kind: the states of two plain lists merged = the state of both lists folded."""
    k = kpi(name, **PARAMS_OF.get(name, {}))
    a_obs = observations([v for v, _ in head], [o for _, o in head])
    b_obs = observations([v for v, _ in tail], [o for _, o in tail])
    agg = kpis.make(k, EXP)
    a, b = _state(k, a_obs), _state(k, b_obs)
    snapshot = json.dumps([a, b], sort_keys=True)
    merged = agg.merge(a, b)
    assert json.dumps([a, b], sort_keys=True) == snapshot  # neither input changed
    for group in ("treatment", "control"):
        _same(name, agg.result(merged, group), agg.result(_state(k, a_obs + b_obs), group))
        _same(name, agg.result(agg.merge(agg.initialize(), merged), group), agg.result(merged, group))


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(kpi_kinds.KIND_NAMES),
    st.lists(st.tuples(finite, st.integers(min_value=0, max_value=10**12)), max_size=40),
    st.lists(st.tuples(finite, st.integers(min_value=0, max_value=10**12)), max_size=40),
    st.sampled_from(DEVICES),
)
def test_add_all_is_the_fold_of_add(name, head, tail, device) -> None:
    """Every kind: one message's observations added at once (``add_all``, what the worker
    does) give the very state of ``add`` one observation at a time, from any state; no
    kind but impact (documented in place) changes its input state."""
    k = kpi(name, **PARAMS_OF.get(name, {}))
    agg = kpis.make(k, EXP)
    state = _state(k, observations([v for v, _ in head], [o for _, o in head]))
    device_id, group = device
    stamps = [T0 + off % (2 * SPAN_MS) for _, off in tail]
    message = kpis.Observations([v for v, _ in tail], stamps, device_id, group, T0 + 2 * SPAN_MS)
    one_by_one = json.loads(json.dumps(state))
    for o in message.each():
        one_by_one = agg.add(one_by_one, o)
    snapshot = json.dumps(state)
    at_once = agg.add_all(state, message)
    assert repr(at_once) == repr(one_by_one)
    if name != "impact":
        assert json.dumps(state) == snapshot


def test_add_all_of_nothing_changes_nothing() -> None:
    for name in kpi_kinds.KIND_NAMES:
        agg = kpis.make(kpi(name, **PARAMS_OF.get(name, {})), EXP)
        state = _state(kpi(name, **PARAMS_OF.get(name, {})), [ob(3.0)])
        empty = kpis.Observations([], [], "t2", "treatment", T0)
        assert agg.add_all(json.loads(json.dumps(state)), empty) == state, name
