"""Fast synthetic pilots for checking the impact statistics over many seeds.

The device models (:mod:`simulators.models`) publish realistic messages one reading at a
time; checking an interval's coverage needs hundreds of whole pilots, so this module draws
a pilot's readings of one metric at once with numpy, from the features that make street
sensors hard to analyse:

* a level per device (log-normal spread ``level_sd``, or ± in the unit for interval scales);
* autocorrelated noise per device: AR(1) with lag-1 correlation ``ar`` per reading and
  marginal SD ``noise_sd`` (relative for ratio-scale metrics, in the unit otherwise);
* a daily and weekly pattern shared by every device;
* shared weather: a smooth AR(1) process on hourly knots (SD ``weather_sd``, correlation
  time ``weather_hours``), the same for treatment and control;
* a shared linear trend over the whole span (``trend``: the change from the baseline start
  to the intervention end);
* the true effect on treatment devices from the intervention start: multiplicative
  (``1 + effect``) for ratio scales, added in the unit for interval scales.

``generate(spec, seed)`` returns the experiment manifest and ``(device_id, ts_ms, value)``
readings, the exact input of :func:`streams.impact.estimate_impact`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import numpy as np
from scipy.signal import lfilter

from pilotlab.manifest import Experiment
from pilotlab.metrics import METRICS

T0 = datetime(2026, 3, 2, tzinfo=UTC)  # a Monday


@dataclass(frozen=True, slots=True)
class PilotSpec:
    name: str
    treatment: int
    control: int
    interval_s: int = 900
    baseline_days: float = 14
    intervention_days: float = 14
    metric: str = "no2"
    effect: float = 0.0  # relative for ratio-scale metrics, in the unit otherwise
    level: float = 40.0
    level_sd: float = 0.25
    ar: float = 0.85
    noise_sd: float = 0.2
    daily: float = 0.3
    weekly: float = 0.15
    weather_sd: float = 0.2
    weather_hours: float = 36.0
    trend: float = 0.0

    @property
    def ratio(self) -> bool:
        return METRICS[self.metric].scale == "ratio"

    def with_(self, **changes) -> PilotSpec:
        return replace(self, **changes)

    def experiment(self) -> Experiment:
        b_end = T0 + timedelta(days=self.baseline_days)
        i_end = b_end + timedelta(days=self.intervention_days)
        devices = [
            {"id": f"t{i:02d}", "kind": "air_quality", "group": "treatment", "interval": f"{self.interval_s}s"}
            for i in range(self.treatment)
        ] + [
            {"id": f"c{i:02d}", "kind": "air_quality", "group": "control", "interval": f"{self.interval_s}s"}
            for i in range(self.control)
        ]
        return Experiment.model_validate(
            {
                "id": self.name,
                "title": self.name,
                "startup": "synthetic",
                "district": "synthetic",
                "location": {"lat": 45.07, "lon": 7.68},
                "periods": {
                    "baseline": {"start": T0.isoformat(), "end": b_end.isoformat()},
                    "intervention": {"start": b_end.isoformat(), "end": i_end.isoformat()},
                },
                "devices": devices,
                "kpis": [{"name": "impact", "metric": self.metric, "kind": "impact"}],
                "simulation": {"true_effects": {self.metric: self.effect}},
            }
        )


def _ar1(rng: np.random.Generator, rows: int, n: int, phi: float) -> np.ndarray:
    """``rows`` stationary AR(1) series of length ``n``, unit marginal variance."""
    e = rng.standard_normal((rows, n)) * np.sqrt(1 - phi * phi)
    e[:, 0] = rng.standard_normal(rows)
    zi = np.zeros((rows, 1))
    out, _ = lfilter([1.0], [1.0, -phi], e, axis=1, zi=zi)
    return out


def generate(spec: PilotSpec, seed: int) -> tuple[Experiment, list[tuple[str, int, float]]]:
    exp = spec.experiment()
    rng = np.random.default_rng(seed)
    t0 = int(T0.timestamp())
    span_s = (spec.baseline_days + spec.intervention_days) * 86400
    n = int(span_s // spec.interval_s)
    ts = t0 + np.arange(n) * spec.interval_s
    hours = (ts - t0) / 3600.0
    day = (hours % 24) / 24
    dow = (hours // 24) % 7
    pattern = spec.daily * np.sin(2 * np.pi * (day - 0.3)) + spec.weekly * np.where(dow >= 5, -1.0, 0.4)
    knots = int(hours[-1]) + 2
    w = _ar1(rng, 1, knots, float(np.exp(-1.0 / spec.weather_hours)))[0] * spec.weather_sd
    weather = np.interp(hours, np.arange(knots), w)
    trend = spec.trend * (ts - t0) / span_s
    ids = [d.id for d in exp.devices]
    treated = np.array([d.group == "treatment" for d in exp.devices])
    after = ts >= t0 + spec.baseline_days * 86400
    noise = _ar1(rng, len(ids), n, spec.ar) * spec.noise_sd
    levels = rng.standard_normal(len(ids)) * spec.level_sd
    if spec.ratio:
        base = spec.level * np.exp(levels)[:, None] * np.exp(pattern + weather)[None, :] * (1 + trend)[None, :]
        effect = np.where(treated[:, None] & after[None, :], 1 + spec.effect, 1.0)
        values = base * effect * np.exp(noise - spec.noise_sd**2 / 2)
    else:
        base = spec.level + levels[:, None] * 10 + (pattern + weather)[None, :] * 5 + trend[None, :]
        values = base + np.where(treated[:, None] & after[None, :], spec.effect, 0.0) + noise
    ts_ms = (ts * 1000).astype(np.int64).tolist()
    readings = [
        (dev, t, v) for dev, row in zip(ids, values.tolist(), strict=True) for t, v in zip(ts_ms, row, strict=True)
    ]
    return exp, readings
