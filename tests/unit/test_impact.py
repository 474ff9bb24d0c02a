"""The impact statistics (streams.impact): hand-computed cases, the verdict rules and their
warning codes, mergeable state, planning, and coverage over many simulated pilots guarded
within a binomial tolerance (``make bench-impact`` prints the full table)."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from pilotlab.contracts import IMPACT_WARNINGS as WARNINGS
from pilotlab.contracts import to_ms
from pilotlab.manifest import Experiment
from simulators.synthetic import PilotSpec, generate
from streams import impact
from streams.impact import estimate_impact

DAY = 86_400_000


def experiment(treatment: int = 3, control: int = 3, days: int = 14, metric: str = "no2", **kpi) -> Experiment:
    devices = [{"id": f"t{i}", "kind": "air_quality", "group": "treatment", "interval": "1h"} for i in range(treatment)]
    devices += [{"id": f"c{i}", "kind": "air_quality", "group": "control", "interval": "1h"} for i in range(control)]
    t0 = datetime(2026, 3, 2, tzinfo=UTC)
    mid, end = t0 + timedelta(days=days), t0 + timedelta(days=2 * days)
    return Experiment.model_validate(
        {
            "id": "imp",
            "title": "t",
            "startup": "s",
            "district": "d",
            "location": {"lat": 45.0, "lon": 7.6},
            "periods": {
                "baseline": {"start": t0.isoformat(), "end": mid.isoformat()},
                "intervention": {"start": mid.isoformat(), "end": end.isoformat()},
            },
            "devices": devices,
            "kpis": [{"name": "k", "metric": metric, "kind": "impact", **kpi}],
        }
    )


def flat(exp: Experiment, means: dict[str, tuple[float, float]]) -> list[tuple[str, int, float]]:
    """Hourly readings at a constant value per device and period: (baseline, intervention)."""
    b0, b1 = to_ms(exp.periods.baseline.start), to_ms(exp.periods.baseline.end)
    i0, i1 = to_ms(exp.periods.intervention.start), to_ms(exp.periods.intervention.end)
    out = []
    for dev, (base, inter) in means.items():
        out += [(dev, ts, base) for ts in range(b0, b1, 3_600_000)]
        out += [(dev, ts, inter) for ts in range(i0, i1, 3_600_000)]
    return out


# --- hand-computed ---------------------------------------------------------------------------------

T_MEANS = {"t0": (10.0, 8.0), "t1": (20.0, 15.0), "t2": (40.0, 34.0)}
C_MEANS = {"c0": (12.0, 12.0), "c1": (30.0, 33.0), "c2": (25.0, 24.0)}


def test_relative_effect_is_the_t_interval_of_device_log_ratios() -> None:
    exp = experiment()
    r = estimate_impact(exp, "k", flat(exp, T_MEANS | C_MEANS))
    t = [math.log(i / b) for b, i in T_MEANS.values()]
    c = [math.log(i / b) for b, i in C_MEANS.values()]
    diff = sum(t) / 3 - sum(c) / 3
    se = math.sqrt((stats.tvar(t) + stats.tvar(c)) / 3)  # equal groups: pooled = unpooled
    half = stats.t.ppf(0.975, 4) * se
    assert r.scale == "relative" and r.unit is None
    assert r.estimate == pytest.approx(math.expm1(diff))
    assert (r.ci_low, r.ci_high) == pytest.approx((math.expm1(diff - half), math.expm1(diff + half)))
    assert r.df == 4 and r.devices == {"treatment": 3, "control": 3}
    assert r.design == "difference-in-differences" and r.final
    assert r.readings == {"treatment": {"baseline": 3 * 336, "intervention": 3 * 336},
                          "control": {"baseline": 3 * 336, "intervention": 3 * 336}}  # fmt: skip
    assert r.p_value == pytest.approx(2 * stats.t.sf(abs(diff / se), 4))
    assert r.warnings == ()  # placebo: flat baselines, no shift
    assert r.verdict == ("improved" if r.ci_high < 0 else "no clear effect")


def test_unequal_groups_take_the_larger_of_pooled_and_unpooled_error() -> None:
    exp = experiment(treatment=2, control=4)
    means = {"t0": (10.0, 8.0), "t1": (10.0, 5.0)} | {f"c{i}": (10.0, 10.0 + 0.1 * i) for i in range(4)}
    r = estimate_impact(exp, "k", flat(exp, means))
    t = [math.log(0.8), math.log(0.5)]
    c = [math.log(1 + 0.01 * i) for i in range(4)]
    pooled = (stats.tvar(t) + 3 * stats.tvar(c)) / 4 * (1 / 2 + 1 / 4)
    unpooled = stats.tvar(t) / 2 + stats.tvar(c) / 4
    assert unpooled > pooled  # the small group has the large spread
    assert r.se == pytest.approx(math.sqrt(unpooled)) and r.df == 4
    assert "few_devices" in r.warnings


def test_interval_scale_metric_is_an_absolute_difference_in_its_unit() -> None:
    exp = experiment(metric="temperature")
    means = {"t0": (0.2, 1.3), "t1": (1.0, 2.1), "t2": (0.5, 1.4), "c0": (0.4, 0.5), "c1": (1.1, 1.0), "c2": (0.1, 0.3)}
    r = estimate_impact(exp, "k", flat(exp, means))
    assert r.scale == "absolute" and r.unit == "degC"
    assert r.estimate == pytest.approx((1.1 + 1.1 + 0.9) / 3 - (0.1 - 0.1 + 0.2) / 3)
    assert r.ci_low < r.estimate < r.ci_high
    # the worker's changelog and Kafka records are orjson: plain floats only (no numpy scalars)
    assert orjson.loads(orjson.dumps(r.as_dict()))["ci_low"] == pytest.approx(r.ci_low)
    assert all(type(v) in (float, int) for v in (r.estimate, r.ci_low, r.ci_high, r.se, r.df, r.p_value))


def test_a_mean_at_zero_falls_back_to_absolute_with_a_warning() -> None:
    exp = experiment(metric="occupancy")
    means = {"t0": (0.0, 0.1), "t1": (0.2, 0.3), "t2": (0.4, 0.5), "c0": (0.1, 0.1), "c1": (0.2, 0.2), "c2": (0.3, 0.3)}
    r = estimate_impact(exp, "k", flat(exp, means))
    assert r.scale == "absolute" and "relative_undefined" in r.warnings
    assert r.estimate == pytest.approx(0.1)


# --- verdicts and warnings ------------------------------------------------------------------------


def test_verdict_follows_the_desired_direction() -> None:
    exp_lower = experiment(better="lower")
    exp_higher = experiment(better="higher")
    means = {f"t{i}": (10.0 + i, (10.0 + i) * (0.7 + 0.01 * i)) for i in range(3)}
    means |= {f"c{i}": (10.0 + i, (10.0 + i) * (1.0 + 0.01 * i)) for i in range(3)}
    assert estimate_impact(exp_lower, "k", flat(exp_lower, means)).verdict == "improved"
    assert estimate_impact(exp_higher, "k", flat(exp_higher, means)).verdict == "worsened"


@pytest.mark.parametrize(
    ("treatment", "control", "days", "cut", "warning"),
    [
        (3, 0, 14, 0, "no_control_group"),
        (1, 3, 14, 0, "no_replication"),
        (3, 3, 3, 0, "short_period"),
        (3, 3, 14, 3 * DAY, "interim"),
    ],
)
def test_designs_that_cannot_carry_a_verdict_are_inconclusive(treatment, control, days, cut, warning) -> None:
    exp = experiment(treatment, control, days)
    means = {f"t{i}": (10.0 + i, (10.0 + i) * (0.5 + 0.01 * i)) for i in range(treatment)}
    means |= {f"c{i}": (10.0 + i, (10.0 + i) * (1.0 + 0.01 * i)) for i in range(control)}
    end = to_ms(exp.periods.intervention.end)
    readings = [r for r in flat(exp, means) if r[1] < end - cut]
    r = estimate_impact(exp, "k", readings)
    assert warning in r.warnings, r.warnings
    assert r.verdict == "inconclusive"
    assert r.estimate == pytest.approx(-0.5, abs=0.02)  # the estimate is still shown
    assert all(w in WARNINGS for w in r.warnings)


def test_one_device_per_group_has_no_interval() -> None:
    exp = experiment(1, 1)
    r = estimate_impact(exp, "k", flat(exp, {"t0": (10.0, 5.0), "c0": (10.0, 10.0)}))
    assert r.estimate == pytest.approx(-0.5)
    assert r.ci_low is None and r.ci_high is None
    assert {"no_replication", "no_interval"} <= set(r.warnings) and r.verdict == "inconclusive"


def test_a_baseline_that_shifts_between_its_halves_fails_the_placebo_check() -> None:
    exp = experiment()
    b0, b1 = to_ms(exp.periods.baseline.start), to_ms(exp.periods.baseline.end)
    mid = (b0 + b1) // 2
    means = {f"t{i}": (10.0 + i, (10.0 + i) * 0.5) for i in range(3)} | {
        f"c{i}": (10.0 + i, 10.0 + i) for i in range(3)
    }
    # the treatment devices' second baseline half is already ~50% higher than the first
    readings = [(d, ts, v * (1.5 + 0.01 * int(d[1])) if d[0] == "t" and mid <= ts < b1 else v)
                for d, ts, v in flat(exp, means)]  # fmt: skip
    r = estimate_impact(exp, "k", readings)
    assert r.placebo is not None and r.placebo.estimate > 0.4
    assert "placebo_shift" in r.warnings and r.verdict == "inconclusive"


def test_devices_missing_a_period_are_left_out_and_sparse_ones_flagged() -> None:
    exp = experiment(4, 3)
    means = {f"t{i}": (10.0 + i, (10.0 + i) * (0.6 + 0.01 * i)) for i in range(4)}
    means |= {f"c{i}": (10.0 + i, (10.0 + i) * (1.0 + 0.01 * i)) for i in range(3)}
    start_int = to_ms(exp.periods.intervention.start)
    readings = [r for r in flat(exp, means) if not (r[0] == "t3" and r[1] >= start_int)]
    readings = [r for r in readings if r[0] != "t2" or r[1] % (4 * 3_600_000) == 0]  # t2: 1 in 4
    r = estimate_impact(exp, "k", readings)
    assert r.devices == {"treatment": 3, "control": 3}
    assert {"devices_excluded", "low_completeness"} <= set(r.warnings)


def test_no_readings_yet() -> None:
    r = estimate_impact(experiment(), "k", [])
    assert r.estimate is None and r.verdict == "inconclusive" and r.warnings[0] == "no_data"


def test_unknown_device_or_kpi_is_an_error() -> None:
    exp = experiment()
    with pytest.raises(ValueError, match="not in experiment"):
        estimate_impact(exp, "k", [("x9", to_ms(exp.periods.baseline.start), 1.0)])
    with pytest.raises(KeyError):
        estimate_impact(exp, "nope", [])


# --- the state ---------------------------------------------------------------------------------------

reading = st.tuples(
    st.sampled_from(["t0", "t1", "t2", "c0", "c1", "c2"]),
    st.integers(0, 28 * 24 - 1).map(lambda h: to_ms(experiment().periods.baseline.start) + h * 3_600_000),
    st.floats(0.1, 1000, allow_nan=False),
)


@settings(max_examples=100, deadline=None)
@given(st.lists(reading, max_size=60), st.lists(reading, max_size=60), st.randoms(use_true_random=False))
def test_merge_equals_one_pass_in_any_order(a, b, rnd) -> None:
    exp = experiment()
    d = impact.design(exp, exp.kpis[0])
    group = {dev.id: dev.group for dev in exp.devices}

    def fold(rows):
        state = impact.initialize()
        for dev, ts, v in rows:
            impact.add(state, d, dev, group[dev], ts, v)
        return state

    merged = impact.merge(fold(a), fold(b))
    shuffled = a + b
    rnd.shuffle(shuffled)
    one = fold(shuffled)
    assert merged["t"] == one["t"] and merged["d"].keys() == one["d"].keys()
    for dev, row in one["d"].items():
        assert merged["d"][dev][:2] == row[:2]
        assert merged["d"][dev][1::2] == row[1::2]  # counts exactly
        assert merged["d"][dev][2::2] == pytest.approx(row[2::2])  # sums to rounding


# --- planning ---------------------------------------------------------------------------------------


def test_plan_from_a_stated_change_sd() -> None:
    exp = experiment(5, 5, expected_effect=-0.05, change_sd=0.04)
    p = impact.plan(exp, exp.kpis[0])
    mde = (stats.t.ppf(0.975, 8) + stats.t.ppf(0.8, 8)) * 0.04 * math.sqrt(2 / 5)
    assert p.mde_decrease == pytest.approx(math.expm1(-mde)) and p.mde_increase == pytest.approx(math.expm1(mde))
    assert "effect_below_mde" in p.warnings  # −5% < the ~−7.5% it can detect
    big = experiment(5, 5, expected_effect=-0.2, change_sd=0.04)
    assert impact.plan(big, big.kpis[0]).warnings == ()


def test_plan_from_a_baseline_and_without_variability() -> None:
    exp, readings = generate(PilotSpec("plan", 4, 4, interval_s=3600), 1)
    d = impact.design(exp, exp.kpis[0])
    group = {dev.id: dev.group for dev in exp.devices}
    state = impact.initialize()
    for dev, ts, v in readings:
        if ts < d.baseline[1]:
            impact.add(state, d, dev, group[dev], ts, v)
    p = impact.plan(exp, exp.kpis[0], baseline_state=state)
    assert p.change_sd is not None and 0 < p.change_sd < 0.5 and "baseline" in p.source
    assert p.mde_decrease < 0 < p.mde_increase
    none = impact.plan(exp, exp.kpis[0])
    assert none.mde_decrease is None and "unknown_variability" in none.warnings
    alone = experiment(4, 0, change_sd=0.05)
    assert "no_control_group" in impact.plan(alone, alone.kpis[0]).warnings


# --- coverage and false alarms over many simulated pilots -----------------------------------------


def binomial_band(n: int, p: float, tail: float = 0.0005) -> tuple[int, int]:
    """The counts a Binomial(n, p) falls outside with probability ``2·tail``."""
    return int(stats.binom.ppf(tail, n, p)), int(stats.binom.isf(tail, n, p))


SEEDS = 400


@pytest.mark.parametrize(
    "spec",
    [
        PilotSpec("cov-4x4", 4, 4, interval_s=3600, effect=-0.15, ar=0.9, trend=0.1),
        PilotSpec("cov-3x3-temp", 3, 3, interval_s=3600, metric="temperature", level=0.8, effect=1.0, noise_sd=1.0),
    ],
    ids=lambda s: s.name,
)
def test_the_95_percent_interval_covers_the_truth_95_percent_of_the_time(spec) -> None:
    covered = 0
    for seed in range(SEEDS):
        exp, readings = generate(spec, seed)
        r = estimate_impact(exp, "impact", readings)
        covered += r.ci_low <= spec.effect <= r.ci_high
    lo, hi = binomial_band(SEEDS, 0.95)
    assert lo <= covered <= hi, f"{covered}/{SEEDS} covered; a 95% interval gives {lo}–{hi} (99.9% band)"


def test_a_pilot_with_no_effect_rarely_cries_wolf_and_never_without_a_control() -> None:
    null = PilotSpec("null-5x5", 5, 5, interval_s=3600, ar=0.9, weather_sd=0.3)
    alarms = 0
    for seed in range(SEEDS):
        exp, readings = generate(null, seed)
        alarms += estimate_impact(exp, "impact", readings).verdict in ("improved", "worsened")
    assert alarms <= binomial_band(SEEDS, 0.05)[1], alarms
    for spec in (PilotSpec("before-after", 6, 0, interval_s=3600, effect=0.05, trend=-0.08),
                 PilotSpec("one-each", 1, 1, interval_s=3600)):  # fmt: skip
        for seed in range(40):
            exp, readings = generate(spec, seed)
            assert estimate_impact(exp, "impact", readings).verdict == "inconclusive"


def test_binomial_band_is_what_it_says() -> None:
    lo, hi = binomial_band(SEEDS, 0.95)
    assert 0.9 * SEEDS < lo < 0.95 * SEEDS < hi < 0.99 * SEEDS  # 400 seeds: 91.8%–98.3%
    rng = random.Random(0)
    outside = sum(not lo <= sum(rng.random() < 0.95 for _ in range(SEEDS)) <= hi for _ in range(2000))
    assert outside <= 10  # ~0.1% expected
