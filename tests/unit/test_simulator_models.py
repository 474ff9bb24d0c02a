"""Deterministic device models and the ground-truth DiD (no services needed)."""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from datetime import UTC, datetime, timedelta

import pytest

from pilotlab.manifest import Experiment
from pilotlab.metrics import METRICS
from simulators.models import MODELS, Sample, build_models, derive_seed, local_time, simulate_experiment
from simulators.scenario import did_from_samples, expected_effect, group_means

KINDS = ("air_quality", "traffic_counter", "parking", "noise", "street_light", "e_mobility", "waste_bin")
KIND_METRICS = {
    "air_quality": {"pm25", "pm10", "no2"},
    "traffic_counter": {"vehicles_per_hour", "mean_speed"},
    "parking": {"occupancy"},
    "noise": {"noise"},
    "street_light": {"energy", "dimming"},
    "e_mobility": {"trips", "lat", "lon"},
    "waste_bin": {"fill_level"},
}
T0 = datetime(2026, 3, 2, tzinfo=UTC)  # a Monday; the run crosses the switch to CEST on 29 March


def make_experiment(
    devices: list[dict],
    *,
    baseline_days: int = 14,
    intervention_days: int = 14,
    true_effects: dict[str, float] | None = None,
    exp_id: str = "sim-test",
    simulation: dict | None = None,
) -> Experiment:
    mid = T0 + timedelta(days=baseline_days)
    data = {
        "id": exp_id,
        "title": "simulated pilot",
        "startup": "acme",
        "district": "san-salvario",
        "location": {"lat": 45.07, "lon": 7.69},
        "periods": {
            "baseline": {"start": T0.isoformat(), "end": mid.isoformat()},
            "intervention": {
                "start": mid.isoformat(),
                "end": (mid + timedelta(days=intervention_days)).isoformat(),
            },
        },
        "devices": devices,
        "kpis": [{"name": "kpi", "metric": "energy", "kind": "mean", "window": "1h"}],
    }
    if true_effects is not None or simulation is not None:
        data["simulation"] = {**(simulation or {}), **({"true_effects": true_effects} if true_effects else {})}
    return Experiment.model_validate(data)


def all_kinds(interval: str = "15m") -> list[dict]:
    return [
        {"id": f"{kind.replace('_', '-')}-{i}", "kind": kind, "group": group, "interval": interval}
        for kind in KINDS
        for i, group in enumerate(("treatment", "control"))
    ]


def lights(n_treatment: int = 6, n_control: int = 6) -> list[dict]:
    return [
        {"id": f"t{i}", "kind": "street_light", "group": "treatment", "interval": "15m"}
        for i in range(n_treatment)
    ] + [
        {"id": f"c{i}", "kind": "street_light", "group": "control", "interval": "15m"}
        for i in range(n_control)
    ]


# --- determinism --------------------------------------------------------------------------


def test_same_seed_same_sequence_and_different_seed_differs():
    exp = make_experiment(all_kinds(), baseline_days=1, intervention_days=1, true_effects={"no2": -0.2})
    first = list(simulate_experiment(exp, seed=7))
    assert first == list(simulate_experiment(exp, seed=7))
    assert first != list(simulate_experiment(exp, seed=8))
    assert len(first) == len(exp.devices) * 2 * 96


def test_seed_derivation_is_stable_and_not_pythons_hash():
    # a fixed value: the same in every process and every Python version
    assert derive_seed(1, "exp", "dev") == derive_seed(1, "exp", "dev")
    assert derive_seed(1, "exp", "dev") != derive_seed(1, "ex", "pdev")
    assert derive_seed(1, "exp", "dev") != derive_seed(2, "exp", "dev")


def test_every_device_kind_has_a_model():
    assert set(MODELS) == set(KINDS)
    for kind, model in MODELS.items():
        assert set(model.metrics) == KIND_METRICS[kind]
        assert all(m in METRICS for m in model.metrics)


# --- ranges, ordering ------------------------------------------------------------------------


def test_every_value_within_the_metric_range_over_14_days():
    # strong effects push bounded metrics against their limits: still clipped
    effects = {
        "occupancy": 0.8,
        "fill_level": 0.9,
        "dimming": 0.5,
        "energy": -0.3,
        "trips": 2.0,
        "noise": -8.0,  # dB(A): the sound level's effect is added in its unit
    }
    exp = make_experiment(all_kinds(), baseline_days=7, intervention_days=7, true_effects=effects)
    kinds = {d.id: d.kind for d in exp.devices}
    seen: dict[str, set[str]] = defaultdict(set)
    for s in simulate_experiment(exp, seed=3):
        assert set(s.metrics) == KIND_METRICS[kinds[s.device_id]]
        for name, value in s.metrics.items():
            m = METRICS[name]
            assert isinstance(value, float), (name, value)
            assert math.isfinite(value) and m.low <= value <= m.high, (s, name)
        seen[kinds[s.device_id]].update(s.metrics)
    assert set(seen) == set(KINDS)


def test_samples_are_in_timestamp_order_with_per_device_seq():
    devices = all_kinds()
    devices[0]["interval"] = "10m"
    devices[1]["interval"] = "1h"
    exp = make_experiment(devices, baseline_days=1, intervention_days=1)
    samples = list(simulate_experiment(exp, seed=1))
    assert all(isinstance(s, Sample) for s in samples)
    assert all(a.ts_ms <= b.ts_ms for a, b in itertools.pairwise(samples))
    per_device: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        per_device[s.device_id].append(s)
    start_ms = int(T0.timestamp() * 1000)
    end_ms = int((T0 + timedelta(days=2)).timestamp() * 1000)
    for d in exp.devices:
        got = per_device[d.id]
        assert [s.seq for s in got] == list(range(len(got)))
        assert [s.ts_ms for s in got] == list(range(start_ms, end_ms, d.interval * 1000))


def test_start_and_end_bound_the_run():
    exp = make_experiment(lights(1, 0), baseline_days=1, intervention_days=1)
    start = T0 + timedelta(hours=6)
    end = T0 + timedelta(hours=7)
    samples = list(simulate_experiment(exp, seed=1, start=start, end=end))
    assert [s.seq for s in samples] == [0, 1, 2, 3]
    assert samples[0].ts_ms == int(start.timestamp() * 1000)
    assert list(simulate_experiment(exp, seed=1, start=end, end=start)) == []
    with pytest.raises(ValueError, match="timezone"):
        simulate_experiment(exp, seed=1, start=datetime(2026, 3, 2))  # noqa: DTZ001


# --- the true effect ----------------------------------------------------------------------------


def test_did_recovers_a_true_effect_of_minus_30_percent_on_energy():
    exp = make_experiment(lights(), true_effects={"energy": -0.3})
    samples = list(simulate_experiment(exp, seed=42))
    assert len(samples) == 12 * 28 * 96
    assert expected_effect(exp, "energy") == -0.3
    assert did_from_samples(exp, samples, "energy") == pytest.approx(-0.3, abs=0.03)
    # no effect on dimming was set: none is found
    assert expected_effect(exp, "dimming") == 0.0
    assert did_from_samples(exp, samples, "dimming") == pytest.approx(0.0, abs=0.01)


def test_effect_touches_only_treatment_devices_after_the_intervention_start():
    with_effect = make_experiment(
        lights(2, 2), baseline_days=2, intervention_days=2, true_effects={"energy": -0.3}
    )
    without = make_experiment(lights(2, 2), baseline_days=2, intervention_days=2)
    start_ms = int(with_effect.periods.intervention.start.timestamp() * 1000)
    for a, b in zip(simulate_experiment(with_effect, 5), simulate_experiment(without, 5), strict=True):
        assert (a.device_id, a.seq, a.ts_ms) == (b.device_id, b.seq, b.ts_ms)
        if a.device_id.startswith("t") and a.ts_ms >= start_ms:
            assert a.metrics["energy"] == pytest.approx(0.7 * b.metrics["energy"], rel=1e-9, abs=1e-12)
            assert a.metrics["dimming"] == b.metrics["dimming"]
        else:
            assert a == b


def test_did_recovers_effects_on_other_kinds():
    # (effect, tolerance): counts and sawtooth fill levels are noisier than light energy
    effects = {
        "no2": (-0.2, 0.02),
        "vehicles_per_hour": (-0.15, 0.02),
        "occupancy": (0.1, 0.02),
        "trips": (0.25, 0.06),
        "fill_level": (-0.2, 0.1),
    }
    devices = [
        {"id": f"{kind.replace('_', '-')}-{group[0]}{i}", "kind": kind, "group": group, "interval": "15m"}
        for kind in ("air_quality", "traffic_counter", "parking", "e_mobility", "waste_bin")
        for group in ("treatment", "control")
        for i in range(6)
    ]
    exp = make_experiment(devices, true_effects={m: e for m, (e, _) in effects.items()})
    samples = list(simulate_experiment(exp, seed=11))
    for metric, (effect, tolerance) in effects.items():
        assert did_from_samples(exp, samples, metric) == pytest.approx(effect, abs=tolerance), metric
    # a metric without an effect is untouched, even when a related one changes
    assert did_from_samples(exp, samples, "mean_speed") == pytest.approx(0.0, abs=0.01)


def test_did_from_samples_arithmetic():
    exp = make_experiment(lights(1, 1), baseline_days=1, intervention_days=1)
    base = int(T0.timestamp() * 1000)
    after = base + 86_400_000
    samples = [
        Sample("t0", 0, base, {"energy": 2.0}),
        Sample("t0", 1, base + 1, {"energy": 4.0}),  # treatment baseline mean 3
        Sample("t0", 2, after, {"energy": 1.5}),  # treatment intervention mean 1.5
        Sample("c0", 0, base, {"energy": 2.0}),  # control baseline mean 2
        Sample("c0", 1, after, {"energy": 2.5}),  # control intervention mean 2.5
        Sample("c0", 2, after + 86_400_000, {"energy": 99.0}),  # after the intervention: ignored
        Sample("c0", 3, after + 5, {"dimming": 99.0}),  # another metric: ignored
    ]
    means = group_means(exp, samples, "energy")
    assert (means.treatment_baseline, means.treatment_intervention) == (3.0, 1.5)
    assert (means.control_baseline, means.control_intervention) == (2.0, 2.5)
    assert did_from_samples(exp, samples, "energy") == pytest.approx((1.5 / 3.0) / (2.5 / 2.0) - 1)

    treatment_only = make_experiment(lights(1, 0), baseline_days=1, intervention_days=1)
    assert did_from_samples(treatment_only, samples[:3], "energy") == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="not in experiment"):
        did_from_samples(treatment_only, samples, "energy")
    with pytest.raises(ValueError, match="control"):
        did_from_samples(exp, samples[:3], "energy")


def test_expected_effect_without_simulation_section():
    assert expected_effect(make_experiment(lights(1, 0)), "energy") == 0.0


# --- realism ---------------------------------------------------------------------------------


def _means_by_local_hour(samples, metric: str) -> dict[int, float]:
    acc: dict[int, list[float]] = defaultdict(list)
    for s in samples:
        if metric in s.metrics:
            acc[int(local_time(s.ts_ms)[0])].append(s.metrics[metric])
    return {h: sum(v) / len(v) for h, v in acc.items()}


def test_air_quality_has_a_diurnal_traffic_cycle_and_quieter_weekends():
    devices = [{"id": f"aq{i}", "kind": "air_quality", "interval": "15m"} for i in range(4)]
    exp = make_experiment(devices)
    samples = list(simulate_experiment(exp, seed=9))
    by_hour = _means_by_local_hour(samples, "no2")
    assert by_hour[8] > 1.3 * by_hour[3]
    assert by_hour[18] > 1.3 * by_hour[3]
    weekday = [s.metrics["no2"] for s in samples if local_time(s.ts_ms)[1] < 5]
    weekend = [s.metrics["no2"] for s in samples if local_time(s.ts_ms)[1] >= 5]
    assert sum(weekday) / len(weekday) > sum(weekend) / len(weekend)


def test_weather_is_shared_by_the_devices_of_an_experiment():
    devices = [{"id": f"aq{i}", "kind": "air_quality", "interval": "1h"} for i in range(2)]
    exp = make_experiment(devices, baseline_days=14, intervention_days=14)
    daily: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for s in simulate_experiment(exp, seed=4):
        daily[s.device_id][s.ts_ms // 86_400_000].append(s.metrics["pm10"])
    a = [sum(v) / len(v) for _, v in sorted(daily["aq0"].items())]
    b = [sum(v) / len(v) for _, v in sorted(daily["aq1"].items())]
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True))
    corr = cov / math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))
    assert corr > 0.7


def test_street_lights_burn_at_night_only_and_traffic_slows_at_peak():
    devices = [
        {"id": "light", "kind": "street_light", "interval": "15m"},
        {"id": "counter", "kind": "traffic_counter", "interval": "15m"},
    ]
    exp = make_experiment(devices, baseline_days=7, intervention_days=7)
    samples = list(simulate_experiment(exp, seed=2))
    energy = _means_by_local_hour([s for s in samples if s.device_id == "light"], "energy")
    assert energy[12] == 0.0 and energy[14] == 0.0
    assert energy[1] > 0.0 and energy[22] > 0.0
    assert energy[21] > energy[2]  # dimmed after midnight
    counter = [s for s in samples if s.device_id == "counter"]
    volume = _means_by_local_hour(counter, "vehicles_per_hour")
    speed = _means_by_local_hour(counter, "mean_speed")
    assert volume[8] > 3 * volume[3]
    assert speed[8] < speed[3]


def test_waste_bins_are_emptied_on_collection_days():
    devices = [{"id": "bin", "kind": "waste_bin", "interval": "1h"}]
    exp = make_experiment(devices, baseline_days=7, intervention_days=7)
    model = build_models(exp, seed=6)["bin"]
    samples = list(simulate_experiment(exp, seed=6))
    drops = [
        b for a, b in itertools.pairwise(samples) if b.metrics["fill_level"] < a.metrics["fill_level"] - 0.1
    ]
    assert len(drops) >= 3  # two or three collections a week, over two weeks
    for s in drops:
        hour, weekday, _ = local_time(s.ts_ms)
        assert weekday in model.collection_days
        assert model.collection_hour <= hour < model.collection_hour + 1
        assert s.metrics["fill_level"] < 0.1
    assert max(s.metrics["fill_level"] for s in samples) > 0.3


def test_local_time_follows_the_turin_clock():
    zoneinfo = pytest.importorskip("zoneinfo")
    try:
        rome = zoneinfo.ZoneInfo("Europe/Rome")
    except zoneinfo.ZoneInfoNotFoundError:
        pytest.skip("no time-zone database")
    t = datetime(2026, 1, 1, tzinfo=UTC)
    while t < datetime(2027, 1, 1, tzinfo=UTC):
        local = t.astimezone(rome)
        hour, weekday, _ = local_time(int(t.timestamp() * 1000))
        assert hour == pytest.approx(local.hour + local.minute / 60, abs=1e-9), t
        assert weekday == local.weekday(), t
        t += timedelta(minutes=37)


# --- what real sensors have: a slow factor per device, a shared trend, additive dB effects ---


def _lag1(series: list[list[float]]) -> float:
    """Lag-1 autocorrelation pooled over runs of consecutive readings (already centred on
    their device's mean), over the pairs only: short runs do not bias it towards 0."""
    num = den = 0.0
    for run in series:
        for a, b in itertools.pairwise(run):
            num += a * b
            den += (a * a + b * b) / 2
    return num / den


def _night_log_residuals(samples: list[Sample]) -> dict[str, list[list[float]]]:
    """Per street light, runs of consecutive dark readings of ``log(energy / dimming)``,
    centred on the device's mean. Energy is lamp power × light output × the device's slow
    factor × 2% meter noise and ``dimming`` is the light output, so the ratio is the device's
    factor times meter noise: no daily cycle, no level."""
    runs: dict[str, list[list[float]]] = defaultdict(list)
    last: dict[str, int] = {}
    for s in samples:
        if s.metrics["dimming"] <= 0.0 or s.metrics["energy"] <= 0.0:
            continue
        value = math.log(s.metrics["energy"] / s.metrics["dimming"])
        if last.get(s.device_id) == s.seq - 1:
            runs[s.device_id][-1].append(value)
        else:
            runs[s.device_id].append([value])
        last[s.device_id] = s.seq
    out: dict[str, list[list[float]]] = {}
    for device, device_runs in runs.items():
        values = [v for run in device_runs for v in run]
        mean = sum(values) / len(values)
        out[device] = [[v - mean for v in run] for run in device_runs if len(run) > 1]
    return out


def test_a_devices_readings_are_autocorrelated_and_device_noise_sd_0_removes_it():
    exp = make_experiment(lights(3, 3), baseline_days=7, intervention_days=7)
    assert exp.simulation is None  # the defaults: 8%, 2 h
    residuals = _night_log_residuals(list(simulate_experiment(exp, seed=21)))
    assert len(residuals) == 6
    # 15-minute readings, tau = 2 h: exp(-0.25 / 2) ≈ 0.88, diluted a little by the meter noise
    for device, runs in residuals.items():
        assert _lag1(runs) > 0.7, device
    values = [v for runs in residuals.values() for run in runs for v in run]
    sd = math.sqrt(sum(v * v for v in values) / len(values))
    assert sd == pytest.approx(math.hypot(0.08, 0.02), rel=0.3)

    flat = make_experiment(
        lights(3, 3), baseline_days=7, intervention_days=7, simulation={"device_noise_sd": 0}
    )
    residuals = _night_log_residuals(list(simulate_experiment(flat, seed=21)))
    pooled = [run for runs in residuals.values() for run in runs]
    assert abs(_lag1(pooled)) < 0.1  # only the independent meter noise is left
    values = [v for run in pooled for v in run]
    assert math.sqrt(sum(v * v for v in values) / len(values)) == pytest.approx(0.02, rel=0.2)


@pytest.mark.parametrize(("interval", "minutes"), [("15m", 15), ("1h", 60)])
def test_the_device_factor_is_the_same_process_whatever_the_interval(interval, minutes):
    devices = [{"id": f"l{i}", "kind": "street_light", "interval": interval} for i in range(8)]
    exp = make_experiment(devices, simulation={"device_noise_correlation": "3h"})
    assert exp.simulation.device_noise_correlation == 3 * 3600
    residuals = _night_log_residuals(list(simulate_experiment(exp, seed=8)))
    pooled = [run for runs in residuals.values() for run in runs]
    # the meter noise (2%) dilutes the factor's (8%) correlation by 0.08² / (0.08² + 0.02²)
    expected = math.exp(-minutes / 180) * 0.08**2 / (0.08**2 + 0.02**2)
    assert _lag1(pooled) == pytest.approx(expected, abs=0.05)


def test_device_noise_has_its_own_random_stream():
    # with and without the device factor, every other draw is the same: the commanded
    # dimming is identical and the energy differs by a smooth per-device factor only
    noisy = make_experiment(lights(2, 2), baseline_days=2, intervention_days=2)
    quiet = make_experiment(lights(2, 2), baseline_days=2, intervention_days=2, simulation={"device_noise_sd": 0})
    ratios: dict[str, list[float]] = defaultdict(list)
    for a, b in zip(simulate_experiment(noisy, 3), simulate_experiment(quiet, 3), strict=True):
        assert (a.device_id, a.seq, a.ts_ms) == (b.device_id, b.seq, b.ts_ms)
        assert a.metrics["dimming"] == b.metrics["dimming"]
        if b.metrics["energy"] > 0:
            ratios[a.device_id].append(a.metrics["energy"] / b.metrics["energy"])
    for device, r in ratios.items():
        assert min(r) > 0.6 and max(r) < 1.6, device
        assert max(abs(math.log(y / x)) for x, y in itertools.pairwise(r)) < 0.15, device  # smooth


def test_a_trend_shifts_the_later_period_for_treatment_and_control_alike():
    effects = {"energy": -0.3}
    flat = make_experiment(lights(), true_effects=effects)
    rising = make_experiment(lights(), true_effects=effects, simulation={"trend": 0.2})
    flat_samples = list(simulate_experiment(flat, seed=42))
    rising_samples = list(simulate_experiment(rising, seed=42))
    # reading by reading: the shared linear factor, 1 at the baseline start, 1.2 at the end
    t0 = int(T0.timestamp() * 1000)
    span = 28 * 86_400_000
    for a, b in zip(rising_samples, flat_samples, strict=True):
        assert a.metrics["energy"] == pytest.approx(
            b.metrics["energy"] * (1 + 0.2 * (a.ts_ms - t0) / span), rel=1e-9, abs=1e-12
        )
        assert a.metrics["dimming"] == b.metrics["dimming"]
    # before/after moves by about (1 + 0.2·3/4) / (1 + 0.2/4) for both groups (equal periods,
    # nights spread evenly); the difference-in-differences does not move
    shift = (1 + 0.15) / (1 + 0.05)
    flat_means = group_means(flat, flat_samples, "energy")
    rising_means = group_means(rising, rising_samples, "energy")
    for group in ("treatment", "control"):
        before_after_flat = getattr(flat_means, f"{group}_intervention") / getattr(flat_means, f"{group}_baseline")
        before_after = getattr(rising_means, f"{group}_intervention") / getattr(rising_means, f"{group}_baseline")
        assert before_after / before_after_flat == pytest.approx(shift, abs=0.003), group
    assert did_from_samples(rising, rising_samples, "energy") == pytest.approx(
        did_from_samples(flat, flat_samples, "energy"), abs=0.003
    )
    assert did_from_samples(rising, rising_samples, "energy") == pytest.approx(-0.3, abs=0.03)


def test_noise_and_position_effects_are_added_in_their_unit():
    devices = [
        {"id": f"{kind}-{group[0]}{i}", "kind": kind, "group": group, "interval": "15m"}
        for kind in ("noise", "e_mobility")
        for group in ("treatment", "control")
        for i in range(4)
    ]
    effects = {"noise": -3.0, "lat": 0.001, "lon": -0.002}
    with_effect = make_experiment(devices, baseline_days=7, intervention_days=7, true_effects=effects)
    without = make_experiment(devices, baseline_days=7, intervention_days=7)
    start_ms = int(with_effect.periods.intervention.start.timestamp() * 1000)
    treated = {d.id for d in with_effect.devices if d.group == "treatment"}
    with_samples = list(simulate_experiment(with_effect, 5))
    for a, b in zip(with_samples, simulate_experiment(without, 5), strict=True):
        assert (a.device_id, a.seq, a.ts_ms) == (b.device_id, b.seq, b.ts_ms)
        if a.device_id in treated and a.ts_ms >= start_ms:
            for metric, effect in effects.items():
                if metric in a.metrics:
                    assert a.metrics[metric] == pytest.approx(b.metrics[metric] + effect, abs=1e-9), metric
            assert a.metrics.get("trips") == b.metrics.get("trips")
        else:
            assert a == b
    # the difference-in-differences of mean levels, in dB(A), is the effect
    m = group_means(with_effect, with_samples, "noise")
    did_db = (m.treatment_intervention - m.treatment_baseline) - (m.control_intervention - m.control_baseline)
    assert did_db == pytest.approx(-3.0, abs=0.5)


def test_a_trend_on_sound_energy_adds_decibels():
    devices = [{"id": "mic", "kind": "noise", "interval": "1h"}]
    flat = make_experiment(devices, baseline_days=2, intervention_days=2)
    rising = make_experiment(devices, baseline_days=2, intervention_days=2, simulation={"trend": 1.0})
    t0 = int(T0.timestamp() * 1000)
    for a, b in zip(simulate_experiment(rising, 1), simulate_experiment(flat, 1), strict=True):
        added = 10 * math.log10(1 + (a.ts_ms - t0) / (4 * 86_400_000))
        assert a.metrics["noise"] == pytest.approx(b.metrics["noise"] + added, abs=1e-9)


def test_same_seed_same_samples_with_every_realism_knob_set():
    simulation = {"device_noise_sd": 0.2, "device_noise_correlation": "30m", "trend": -0.1, "weather_sd": 0.5}
    exp = make_experiment(
        all_kinds("10m"), baseline_days=1, intervention_days=1, true_effects={"noise": 2.0}, simulation=simulation
    )
    first = list(simulate_experiment(exp, seed=7))
    assert first == list(simulate_experiment(exp, seed=7))
    assert first == list(simulate_experiment(Experiment.from_json(exp.to_json()), seed=7))
    assert first != list(simulate_experiment(exp, seed=8))
    defaults = make_experiment(all_kinds("10m"), baseline_days=1, intervention_days=1, true_effects={"noise": 2.0})
    assert first != list(simulate_experiment(defaults, seed=7))


def test_weather_sd_scales_the_shared_weather():
    devices = [{"id": "aq", "kind": "air_quality", "interval": "1h"}]
    calm = make_experiment(devices, simulation={"weather_sd": 0, "device_noise_sd": 0})
    stormy = make_experiment(devices, simulation={"weather_sd": 0.6, "device_noise_sd": 0})
    assert build_models(calm, 1)["aq"].weather.factor(T0.timestamp() + 5000) == 1.0

    def daily_log_means(exp):
        daily: dict[int, list[float]] = defaultdict(list)
        for s in simulate_experiment(exp, seed=1):
            daily[s.ts_ms // 86_400_000].append(math.log(s.metrics["pm10"]))
        means = [sum(v) / len(v) for v in daily.values()]
        mean = sum(means) / len(means)
        return math.sqrt(sum((x - mean) ** 2 for x in means) / len(means))

    assert daily_log_means(stormy) > 2 * daily_log_means(calm)


@pytest.mark.parametrize(
    ("simulation", "field"),
    [
        ({"device_noise_sd": -0.1}, "device_noise_sd"),
        ({"device_noise_sd": 8}, "device_noise_sd"),  # 8 meant as 8%: refused
        ({"device_noise_correlation": "0s"}, "device_noise_correlation"),
        ({"device_noise_correlation": "soon"}, "device_noise_correlation"),
        ({"trend": -1.0}, "trend"),
        ({"weather_sd": -0.3}, "weather_sd"),
        ({"true_effects": {"energy": -1.2}}, "true_effects"),
    ],
)
def test_simulation_settings_are_validated(simulation, field):
    with pytest.raises(ValueError, match=field):
        make_experiment(lights(1, 1), simulation=simulation)


def test_simulation_defaults_and_interval_scale_effects():
    sim = make_experiment(lights(1, 1), true_effects={"noise": -3.0, "lat": 0.01}).simulation
    assert sim is not None and sim.true_effects == {"noise": -3.0, "lat": 0.01}  # not relative: no -1 bound
    assert (sim.device_noise_sd, sim.device_noise_correlation, sim.trend, sim.weather_sd) == (0.08, 7200, 0.0, 0.3)


def test_an_outage_silences_its_device_for_its_window_and_nothing_else():
    devices = [{"id": d, "kind": "air_quality", "interval": "15m"} for d in ("a", "b")]
    plain = make_experiment(devices, baseline_days=1, intervention_days=1)
    cut = make_experiment(
        devices, baseline_days=1, intervention_days=1,
        simulation={"outages": [{"device": "a", "start": "27h", "duration": "5h"}]},
    )  # fmt: skip
    everything = list(simulate_experiment(plain, seed=7))
    kept = list(simulate_experiment(cut, seed=7))
    begin = int((T0 + timedelta(days=1, hours=3)).timestamp() * 1000)
    end = begin + 5 * 3600 * 1000
    lost = [s for s in everything if s.device_id == "a" and begin <= s.ts_ms < end]
    assert len(lost) == 5 * 4  # four readings an hour
    assert kept == [s for s in everything if s not in lost]  # the rest identical: the models ran through it


def test_an_outage_of_a_device_the_experiment_does_not_have_is_refused():
    with pytest.raises(ValueError, match=r"simulation\.outages: not devices of this experiment: ghost"):
        make_experiment(
            [{"id": "a", "kind": "air_quality", "interval": "15m"}],
            simulation={"outages": [{"device": "ghost", "start": "1d", "duration": "1h"}]},
        )
