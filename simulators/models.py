"""Deterministic device models for simulated pilots.

Every device kind of :data:`pilotlab.manifest.DeviceKind` has a small model that turns a
timestamp into the readings the device would report. The models are pure: no I/O, no wall
clock, no global random state. All randomness comes from ``random.Random`` instances seeded
from ``(scenario seed, experiment id, device id)`` through BLAKE2 (never ``hash()``, which
is randomised per process), so the same seed gives the same readings in every process.

The signal of each metric is built from what makes real street sensors hard to analyse
(the knobs are the manifest's :class:`pilotlab.manifest.Simulation` section):

* a daily cycle in local civil time (Turin: CET/CEST, EU daylight-saving rule), with
  morning and evening traffic peaks and a weekday/weekend difference;
* a level per device: parameters (site exposure, capacity, lamp power…) drawn once per
  device;
* the device's own slow variation: a multiplicative factor ``exp(z)``, ``z`` an AR(1)
  process with marginal SD ``device_noise_sd`` and correlation time
  ``device_noise_correlation`` (lag-1 correlation ``exp(-interval / tau)`` per reading, so it
  is the same process whatever the device's interval), centred so its mean is 1. It has its
  own random stream per device, so the other draws are the same with or without it;
* a shared linear trend: a factor going from 1 at the baseline start to ``1 + trend`` at the
  intervention end, the same for treatment and control devices;
* a slow "weather" variation shared by all the devices of one experiment (an AR(1) process
  with SD ``weather_sd`` on hourly knots, linearly interpolated, so it is smooth): in full
  for air quality, damped (``weather ** 0.3``) for traffic volume, parking occupancy,
  e-mobility trips, waste production and sound; street lights follow the sun, not the
  weather;
* sensor or counting noise.

The device factor and the trend multiply ratio-scale quantities (pollutant concentrations,
traffic volume — which drives the speed through congestion —, occupancy, lamp energy,
trips, the bin's reported fill level); for the sound level (dB(A), an interval scale) a
factor ``f`` on sound energy adds ``10·log10(f)`` dB. The dimming schedule (a commanded
setting) and the GPS position keep only their own noise.

**True effect.** From the intervention start, each metric of a treatment device is changed
before the reading noise is added: for a ratio-scale metric (:attr:`pilotlab.metrics.Metric.scale`)
the signal is multiplied by ``1 + true_effects[metric]`` (−0.3 = −30%), for an
interval-scale one (sound level in dB(A), latitude and longitude in degrees) the effect is
added in the metric's unit. The device factor, the trend and the weather are the same with
and without the effect, so a treatment device's expected mean in the intervention period is
exactly ``1 + effect`` times (ratio) or ``effect`` more than (interval) what it would have
been without it, and a difference-in-differences against the control devices, which share
the trend and the weather, recovers the effect. Effects apply per metric and independently:
a metric without an entry is unaffected (a volume effect does not leak into the speed), so
the ground truth is exactly ``true_effects``. Control devices and the baseline are never
affected, and the random streams a device consumes do not depend on the effects, so a run
with and without effects differs only where the effect applies. Values are clipped to the
metric's physical range; for a bounded metric driven against its bound (an occupancy pushed
above 1) the clipped mean changes by less than the effect.

A device's readings depend on the ``start`` of the run (its noise streams and, for waste
bins, its fill level start there); the weather, the trend and the daily cycles are
functions of absolute time.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from typing import ClassVar

from pilotlab.contracts import to_ms
from pilotlab.manifest import Device, Experiment, Simulation
from pilotlab.metrics import METRICS

__all__ = [
    "MODELS",
    "AirQualityModel",
    "DeviceModel",
    "EMobilityModel",
    "NoiseModel",
    "ParkingModel",
    "Sample",
    "StreetLightModel",
    "TrafficCounterModel",
    "WasteBinModel",
    "Weather",
    "build_models",
    "derive_seed",
    "device_location",
    "is_dark",
    "local_time",
    "simulate_experiment",
    "traffic_profile",
]

_DAY_S = 86400
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_TAU = 2.0 * math.pi


@dataclass(frozen=True, slots=True)
class Sample:
    """One simulated reading of one device."""

    device_id: str
    seq: int
    ts_ms: int
    metrics: dict[str, float]


def derive_seed(*parts: object) -> int:
    """A 64-bit seed from the parts (length-prefixed, so ``("ab", "c") != ("a", "bc")``)."""
    h = hashlib.blake2b(digest_size=8, person=b"pilotlab-sim")
    for part in parts:
        raw = str(part).encode()
        h.update(len(raw).to_bytes(8, "big"))
        h.update(raw)
    return int.from_bytes(h.digest(), "big")


# --- local time (Turin: CET, CEST from the last Sunday of March to the last Sunday of October)


@lru_cache(maxsize=256)
def _dst_bounds(year: int) -> tuple[int, int]:
    """Start and end of summer time in ``year`` (epoch seconds; the switch is at 01:00 UTC)."""

    def last_sunday(month: int) -> int:
        d = date(year, month, 31)
        d -= timedelta(days=(d.weekday() - 6) % 7)
        return int(datetime(d.year, d.month, d.day, 1, tzinfo=UTC).timestamp())

    return last_sunday(3), last_sunday(10)


@lru_cache(maxsize=8192)
def _dst_bounds_for_day(utc_day: int) -> tuple[int, int]:
    return _dst_bounds(date.fromordinal(_EPOCH_ORDINAL + utc_day).year)


def _local_seconds(ts_s: float) -> float:
    """Seconds since the epoch on the local (Europe/Rome) wall clock."""
    start, end = _dst_bounds_for_day(int(ts_s // _DAY_S))
    return ts_s + (7200 if start <= ts_s < end else 3600)


def local_time(ts_ms: int) -> tuple[float, int, int]:
    """``(hour of day as a float in [0, 24), weekday with Monday = 0, local day number)``
    on the Turin wall clock. The local day number counts days since 1970-01-01."""
    return _local_hms(ts_ms / 1000)


def _local_hms(ts_s: float) -> tuple[float, int, int]:
    local = _local_seconds(ts_s)
    lday = int(local // _DAY_S)
    return (local - lday * _DAY_S) / 3600.0, (lday + 3) % 7, lday


# --- the sun (for street lights) ------------------------------------------------------------


@lru_cache(maxsize=8192)
def _sun_utc(utc_day: int, lat: float, lon: float) -> tuple[float, float]:
    """Sunrise and sunset in seconds from the start of the UTC day (NOAA approximation,
    sun's centre 0.833° below the horizon). Polar night → (0, 0); polar day → (-inf, inf)."""
    doy = date.fromordinal(_EPOCH_ORDINAL + utc_day).timetuple().tm_yday
    g = _TAU / 365.0 * (doy - 0.5)
    decl = (
        0.006918
        - 0.399912 * math.cos(g)
        + 0.070257 * math.sin(g)
        - 0.006758 * math.cos(2 * g)
        + 0.000907 * math.sin(2 * g)
        - 0.002697 * math.cos(3 * g)
        + 0.00148 * math.sin(3 * g)
    )
    eot_min = 229.18 * (
        0.000075
        + 0.001868 * math.cos(g)
        - 0.032077 * math.sin(g)
        - 0.014615 * math.cos(2 * g)
        - 0.040849 * math.sin(2 * g)
    )
    phi = math.radians(lat)
    cos_h = (math.cos(math.radians(90.833)) - math.sin(phi) * math.sin(decl)) / (
        math.cos(phi) * math.cos(decl) or 1e-12
    )
    if cos_h >= 1.0:
        return 0.0, 0.0
    if cos_h <= -1.0:
        return -math.inf, math.inf
    half_day_min = 4.0 * math.degrees(math.acos(cos_h))
    noon_min = 720.0 - 4.0 * lon - eot_min
    return (noon_min - half_day_min) * 60.0, (noon_min + half_day_min) * 60.0


def is_dark(ts_s: float, lat: float, lon: float) -> bool:
    """Whether the sun is down at ``ts_s`` (epoch seconds) at ``(lat, lon)``."""
    day = int(ts_s // _DAY_S)
    sunrise, sunset = _sun_utc(day, lat, lon)
    s = ts_s - day * _DAY_S
    # sunrise/sunset may fall outside the UTC day (far from Greenwich): test the neighbours
    return not (sunrise <= s < sunset or sunrise <= s + _DAY_S < sunset or sunrise <= s - _DAY_S < sunset)


# --- daily profiles (local hour, weekday) --------------------------------------------------


def _bump(hour: float, centre: float, width: float) -> float:
    d = (hour - centre + 12.0) % 24.0 - 12.0
    return math.exp(-0.5 * (d / width) ** 2)


def traffic_profile(hour: float, weekday: int) -> float:
    """Relative traffic volume (≈1 at the weekday morning peak): morning and evening peaks
    on weekdays, a later and flatter day at weekends."""
    if weekday < 5:
        return (
            0.07 + 0.9 * _bump(hour, 8.0, 1.2) + 0.8 * _bump(hour, 18.0, 1.6) + 0.45 * _bump(hour, 13.0, 3.0)
        )
    if weekday == 5:
        return (
            0.09
            + 0.35 * _bump(hour, 10.5, 2.0)
            + 0.55 * _bump(hour, 17.0, 3.0)
            + 0.2 * _bump(hour, 22.0, 2.0)
        )
    return 0.07 + 0.3 * _bump(hour, 11.5, 2.5) + 0.4 * _bump(hour, 17.5, 3.0)


def _parking_profile(hour: float, weekday: int) -> float:
    if weekday < 5:
        return 0.12 + 0.68 * _bump(hour, 12.5, 3.5) + 0.1 * _bump(hour, 19.5, 1.5)
    if weekday == 5:
        return 0.15 + 0.75 * _bump(hour, 12.0, 3.5)
    return 0.12 + 0.4 * _bump(hour, 13.0, 3.0)


def _mobility_profile(hour: float, weekday: int) -> float:
    if weekday < 5:
        return (
            0.04 + 0.8 * _bump(hour, 8.5, 1.3) + 1.0 * _bump(hour, 18.0, 2.0) + 0.5 * _bump(hour, 13.0, 3.0)
        )
    return 0.06 + 0.9 * _bump(hour, 15.0, 3.5)


def _waste_activity(hour: float) -> float:
    return 0.3 + _bump(hour, 12.0, 4.0) + 0.5 * _bump(hour, 19.0, 2.0)


_WASTE_ACTIVITY_MEAN = sum(_waste_activity(i / 10.0) for i in range(240)) / 240.0


def _street_light_level(hour: float) -> float:
    """Adaptive schedule: full output in the evening, dimmed late at night."""
    if hour < 5.0:
        return 0.5
    if hour >= 22.0:
        return 0.7
    return 1.0


# --- shared weather ---------------------------------------------------------------------------


class Weather:
    """A slow, smooth variation shared by the devices of one experiment.

    An AR(1) process in log space on hourly knots counted from ``anchor_s`` (forward and,
    for times before the anchor, backward with its own innovations), linearly interpolated.
    :meth:`factor` has mean 1; a knot's value does not depend on the simulated window. The
    random draws do not depend on ``sd`` (it only scales them), so changing it keeps the
    shape of the weather.
    """

    def __init__(self, seed: int, anchor_s: int, *, correlation_hours: float = 48.0, sd: float = 0.3) -> None:
        self._anchor = anchor_s
        self._phi = math.exp(-1.0 / correlation_hours)
        self._innovation = sd * math.sqrt(1.0 - self._phi**2)
        self._shift = -0.5 * sd * sd  # E[exp(w)] = exp(sd²/2): centre the factor on 1
        self._fwd_rng = random.Random(derive_seed(seed, "forward"))
        self._bwd_rng = random.Random(derive_seed(seed, "backward"))
        w0 = self._fwd_rng.gauss(0.0, sd)
        self._fwd = [w0]  # knot k >= 0
        self._bwd = [w0]  # knot -k
        # the devices of an experiment are sampled in timestamp order, mostly at the same
        # instants: remember the last one
        self._last_ts: float | None = None
        self._last_log = 0.0

    def _knot(self, k: int) -> float:
        if k >= 0:
            chain, rng = self._fwd, self._fwd_rng
        else:
            chain, rng, k = self._bwd, self._bwd_rng, -k
        while len(chain) <= k:
            chain.append(self._phi * chain[-1] + rng.gauss(0.0, self._innovation))
        return chain[k]

    def log_factor(self, ts_s: float) -> float:
        if ts_s == self._last_ts:
            return self._last_log
        x = (ts_s - self._anchor) / 3600.0
        k = math.floor(x)
        f = x - k
        value = (1.0 - f) * self._knot(k) + f * self._knot(k + 1) + self._shift
        self._last_ts, self._last_log = ts_s, value
        return value

    def factor(self, ts_s: float, power: float = 1.0) -> float:
        """The weather factor at ``ts_s``, mean 1; ``power`` < 1 gives a damped influence
        (``weather ** power``, re-centred on mean 1)."""
        if power == 1.0:
            return math.exp(self.log_factor(ts_s))
        # log_factor = w + shift with shift = -sd²/2; exp(p·w) has mean exp(p²·sd²/2)
        return math.exp(power * (self.log_factor(ts_s) - self._shift) + power * power * self._shift)


# --- device models -------------------------------------------------------------------------------


_RANGE = {name: (float(m.low), float(m.high)) for name, m in METRICS.items()}
_RATIO = {name: m.scale == "ratio" for name, m in METRICS.items()}
_WEATHER_DAMPING = 0.3  # weather ** 0.3 for the kinds the weather touches only lightly
_DB_PER_LN = 10.0 / math.log(10.0)  # a factor f on sound energy is _DB_PER_LN · ln(f) dB
_exp = math.exp


def _clip(metric: str, value: float) -> float:
    lo, hi = _RANGE[metric]
    return lo if value < lo else hi if value > hi else value


def _poisson(rng: random.Random, lam: float) -> int:
    """A Poisson draw that always consumes the same random numbers (one uniform, one
    normal), whatever ``lam``: the stream stays aligned when an effect changes ``lam``."""
    u = rng.random()
    z = rng.gauss(0.0, 1.0)
    if lam <= 0.0:
        return 0
    if lam > 40.0:
        return max(0, round(lam + z * math.sqrt(lam)))
    p = math.exp(-lam)
    cdf = p
    k = 0
    while u > cdf and k < 400:
        k += 1
        p *= lam / k
        cdf += p
    return k


def device_location(exp: Experiment, device: Device) -> tuple[float, float]:
    """The device's location, or a fixed spot within about 1 km of the experiment's."""
    if device.location is not None:
        return device.location.lat, device.location.lon
    h = derive_seed("location", exp.id, device.id)
    u1 = (h & 0xFFFFFFFF) / 0xFFFFFFFF
    u2 = (h >> 32) / 0xFFFFFFFF
    lat = max(-90.0, min(90.0, exp.location.lat + (u1 - 0.5) * 0.02))
    lon = exp.location.lon + (u2 - 0.5) * 0.028
    lon = (lon + 180.0) % 360.0 - 180.0
    return lat, lon


class DeviceModel:
    """Base class: one device's readings over time.

    :meth:`sample` must be called with increasing timestamps (the device's slow factor is a
    process in time, and some models keep more state, e.g. a waste bin's fill level); it
    returns the device's metrics at ``ts_ms``. Interval metrics (energy, trips, counts)
    cover the interval that ends at ``ts_ms``.

    ``rng`` gives the device's parameters and its reading noise; ``drift_rng`` (its own
    stream) gives the device's slow factor, an AR(1) process in log space with marginal SD
    ``noise_sd`` and correlation time ``noise_correlation_s``. ``trend`` is the relative
    change of the shared linear trend over ``trend_span_ms`` (start, end).
    """

    kind: ClassVar[str] = ""
    metrics: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        device: Device,
        *,
        location: tuple[float, float],
        intervention_start_ms: int,
        true_effects: Mapping[str, float],
        rng: random.Random,
        weather: Weather,
        drift_rng: random.Random | None = None,
        noise_sd: float = 0.0,
        noise_correlation_s: float = 7200.0,
        trend: float = 0.0,
        trend_span_ms: tuple[int, int] = (0, 1),
    ) -> None:
        self.device = device
        self.lat, self.lon = location
        self.interval_s = device.interval
        self.rng = rng
        self.weather = weather
        self._effect_from_ms = intervention_start_ms if device.group == "treatment" else None
        # ratio scale: a multiplier; interval scale: an addend in the metric's unit
        self._effect = {
            m: 1.0 + float(true_effects.get(m, 0.0)) if _RATIO[m] else float(true_effects.get(m, 0.0))
            for m in self.metrics
        }
        self._no_effect = {m: 1.0 if _RATIO[m] else 0.0 for m in self.metrics}
        # the device's slow factor exp(y): y = z - sd²/2 with z a stationary AR(1) of SD sd,
        # so that E[exp(y)] = 1; stored as y, so a regular step is y' = phi·y + c + innovation
        self._noise_sd = float(noise_sd)
        self._tau_ms = float(noise_correlation_s) * 1000.0
        rng_drift = drift_rng if drift_rng is not None else random.Random(derive_seed(device.id, "drift"))
        self._drift_gauss = rng_drift.gauss
        self._shift = -0.5 * self._noise_sd * self._noise_sd
        self._step_ms = self.interval_s * 1000
        self._phi = math.exp(-self._step_ms / self._tau_ms)
        self._c = self._shift * (1.0 - self._phi)
        self._innovation = self._noise_sd * math.sqrt(1.0 - self._phi * self._phi)
        self._y = 0.0
        self._last_ms = -(2**62)  # no reading yet
        t0, t1 = trend_span_ms
        self._trend_t0 = t0
        self._trend_slope = float(trend) / max(1, t1 - t0)  # per millisecond
        if self._noise_sd == 0.0 and self._trend_slope == 0.0:
            self.drift = self._no_drift  # type: ignore[method-assign]
        self._setup()

    def _setup(self) -> None:
        """Draw the device's fixed parameters from ``self.rng`` (a fixed number of draws)."""

    def effects_at(self, ts_ms: int) -> dict[str, float]:
        """Per metric, the multiplier of the signal (ratio scale) or the amount added to it
        in the metric's unit (interval scale) at ``ts_ms``."""
        if self._effect_from_ms is not None and ts_ms >= self._effect_from_ms:
            return self._effect
        return self._no_effect

    def drift(self, ts_ms: int) -> float:
        """The device's slow factor times the shared trend at ``ts_ms`` (a multiplier, mean 1
        without a trend). Advances the device's AR(1) process: call it once per reading, at
        increasing times."""
        if self._noise_sd > 0.0:
            if ts_ms - self._last_ms == self._step_ms:
                y = self._phi * self._y + self._c + self._drift_gauss(0.0, self._innovation)
            else:
                y = self._drift_jump(ts_ms)
            self._y = y
            self._last_ms = ts_ms
            f = _exp(y)
        else:
            f = 1.0
        if self._trend_slope:
            f *= max(1e-9, 1.0 + self._trend_slope * (ts_ms - self._trend_t0))
        return f

    def _drift_jump(self, ts_ms: int) -> float:
        """The first reading (drawn from the stationary distribution) or an irregular step
        (the same process, observed at another lag)."""
        sd, shift = self._noise_sd, self._shift
        if self._last_ms == -(2**62):
            return shift + self._drift_gauss(0.0, sd)
        phi = math.exp(-max(0, ts_ms - self._last_ms) / self._tau_ms)
        return phi * self._y + shift * (1.0 - phi) + self._drift_gauss(0.0, sd * math.sqrt(1.0 - phi * phi))

    @staticmethod
    def _no_drift(ts_ms: int) -> float:
        return 1.0

    def sample(self, ts_ms: int) -> dict[str, float]:
        raise NotImplementedError


class AirQualityModel(DeviceModel):
    """PM2.5, PM10 and NO2 (µg/m³): background plus a traffic share that follows the daily
    traffic cycle, a winter (heating) excess, scaled by the shared weather factor and the
    device's slow factor."""

    kind = "air_quality"
    metrics = ("pm25", "pm10", "no2")

    def _setup(self) -> None:
        self.site = self.rng.uniform(0.75, 1.35)  # exposure to traffic
        self.background = self.rng.uniform(0.85, 1.15)

    def sample(self, ts_ms: int) -> dict[str, float]:
        ts = ts_ms / 1000.0
        hour, weekday, lday = _local_hms(ts)
        traffic = traffic_profile(hour, weekday) * self.site
        scale = self.weather.factor(ts) * self.drift(ts_ms)
        winter = 1.0 + 0.3 * math.cos(_TAU * (lday - 14) / 365.2425)  # peaks mid-January
        bg = self.background * winter
        e = self.effects_at(ts_ms)
        g = self.rng.gauss
        no2 = scale * (12.0 * bg + 48.0 * traffic) * e["no2"] * max(0.0, 1.0 + g(0.0, 0.10))
        pm10 = scale * (15.0 * bg + 14.0 * traffic) * e["pm10"] * max(0.0, 1.0 + g(0.0, 0.12))
        pm25 = scale * (9.0 * bg + 7.0 * traffic) * e["pm25"] * max(0.0, 1.0 + g(0.0, 0.12))
        return {"pm25": _clip("pm25", pm25), "pm10": _clip("pm10", pm10), "no2": _clip("no2", no2)}


class TrafficCounterModel(DeviceModel):
    """Vehicles per hour (a Poisson count over the interval) and mean speed, which falls as
    the volume approaches the road's capacity. The device's slow factor, the trend and the
    damped weather change the demand, and so the speed through congestion; the true effect
    on one metric does not touch the other."""

    kind = "traffic_counter"
    metrics = ("vehicles_per_hour", "mean_speed")

    def _setup(self) -> None:
        self.capacity = self.rng.uniform(700.0, 1800.0)
        self.demand = self.rng.uniform(0.6, 0.85)
        self.free_speed = self.rng.uniform(40.0, 60.0)

    def sample(self, ts_ms: int) -> dict[str, float]:
        ts = ts_ms / 1000.0
        hour, weekday, _ = _local_hms(ts)
        volume = (
            self.capacity
            * self.demand
            * traffic_profile(hour, weekday)
            * self.drift(ts_ms)
            * self.weather.factor(ts, _WEATHER_DAMPING)
        )
        ratio = min(volume / self.capacity, 1.0)
        speed = self.free_speed * (1.0 - 0.55 * ratio * ratio)
        e = self.effects_at(ts_ms)
        dt_h = self.interval_s / 3600.0
        vph = _poisson(self.rng, volume * e["vehicles_per_hour"] * dt_h) / dt_h
        speed = speed * e["mean_speed"] + self.rng.gauss(0.0, 2.0)
        return {
            "vehicles_per_hour": _clip("vehicles_per_hour", vph),
            "mean_speed": _clip("mean_speed", speed),
        }


class ParkingModel(DeviceModel):
    """Share of bays occupied: a daytime peak, busier Saturdays, quiet Sundays, scaled by the
    device's slow factor, the trend and the damped weather; the count of occupied bays varies
    binomially around the expected share."""

    kind = "parking"
    metrics = ("occupancy",)

    def _setup(self) -> None:
        self.bays = self.rng.randint(20, 150)
        self.attractiveness = self.rng.uniform(0.8, 1.1)

    def sample(self, ts_ms: int) -> dict[str, float]:
        ts = ts_ms / 1000.0
        hour, weekday, _ = _local_hms(ts)
        p = _parking_profile(hour, weekday) * self.attractiveness
        p *= self.drift(ts_ms) * self.weather.factor(ts, _WEATHER_DAMPING)
        p = min(0.98, max(0.02, p))
        p = min(1.0, p * self.effects_at(ts_ms)["occupancy"])
        x = p + self.rng.gauss(0.0, math.sqrt(p * (1.0 - p) / self.bays))
        occupied = round(min(1.0, max(0.0, x)) * self.bays)
        return {"occupancy": _clip("occupancy", occupied / self.bays)}


class NoiseModel(DeviceModel):
    """Equivalent sound level in dB(A): a site level plus ten times the log of traffic. The
    device's slow factor, the trend and the damped weather scale the sound energy (a factor
    ``f`` adds ``10·log10(f)`` dB); the true effect is added in dB(A)."""

    kind = "noise"
    metrics = ("noise",)

    def _setup(self) -> None:
        self.site_level = self.rng.uniform(44.0, 52.0)

    def sample(self, ts_ms: int) -> dict[str, float]:
        ts = ts_ms / 1000.0
        hour, weekday, _ = _local_hms(ts)
        energy = (1.0 + 30.0 * traffic_profile(hour, weekday)) * self.drift(ts_ms)
        energy *= self.weather.factor(ts, _WEATHER_DAMPING)
        level = self.site_level + _DB_PER_LN * math.log(energy)
        level = level + self.effects_at(ts_ms)["noise"] + self.rng.gauss(0.0, 1.5)
        return {"noise": _clip("noise", level)}


class StreetLightModel(DeviceModel):
    """A segment of street lights: on while the sun is down (sunrise and sunset by day of
    year at the device's latitude), dimmed late at night. ``dimming`` is the mean light
    output over the interval as a share of full power (0 by day), the commanded schedule;
    ``energy`` is the kWh used over the interval, scaled by the device's slow factor and the
    trend (no weather)."""

    kind = "street_light"
    metrics = ("energy", "dimming")
    _STEP_S = 300.0

    def _setup(self) -> None:
        self.power_kw = self.rng.uniform(0.8, 2.5)

    def sample(self, ts_ms: int) -> dict[str, float]:
        ts = ts_ms / 1000.0
        dt = float(self.interval_s)
        steps = max(1, math.ceil(dt / self._STEP_S))
        step = dt / steps
        output = 0.0
        for i in range(steps):
            t = ts - dt + (i + 0.5) * step
            if is_dark(t, self.lat, self.lon):
                output += _street_light_level(_local_hms(t)[0])
        output /= steps
        e = self.effects_at(ts_ms)
        energy = (
            self.power_kw
            * output
            * dt
            / 3600.0
            * self.drift(ts_ms)
            * e["energy"]
            * max(0.0, 1.0 + self.rng.gauss(0.0, 0.02))
        )
        return {"energy": _clip("energy", energy), "dimming": _clip("dimming", output * e["dimming"])}


class EMobilityModel(DeviceModel):
    """A shared e-mobility station: trips started in the interval (Poisson, commuting peaks
    on weekdays, an afternoon hump at weekends; scaled by the device's slow factor, the trend
    and the damped weather) and the GPS position, jittered by ~15 m (effects on the position
    are added in degrees)."""

    kind = "e_mobility"
    metrics = ("trips", "lat", "lon")

    def _setup(self) -> None:
        self.rate_per_hour = self.rng.uniform(3.0, 12.0)

    def sample(self, ts_ms: int) -> dict[str, float]:
        ts = ts_ms / 1000.0
        hour, weekday, _ = _local_hms(ts)
        e = self.effects_at(ts_ms)
        lam = (
            self.rate_per_hour
            * _mobility_profile(hour, weekday)
            * self.interval_s
            / 3600.0
            * self.drift(ts_ms)
            * self.weather.factor(ts, _WEATHER_DAMPING)
            * e["trips"]
        )
        trips = _poisson(self.rng, lam)
        lat = self.lat + e["lat"] + self.rng.gauss(0.0, 0.00015)
        lon = self.lon + e["lon"] + self.rng.gauss(0.0, 0.0002)
        return {"trips": _clip("trips", float(trips)), "lat": _clip("lat", lat), "lon": _clip("lon", lon)}


class WasteBinModel(DeviceModel):
    """Fill level: rises with daytime activity (faster at weekends, with day-to-day
    variation and the damped weather), saturates at 1 and drops to a small residue on the
    bin's collection days. The reported level is scaled by the device's slow factor and the
    trend."""

    kind = "waste_bin"
    metrics = ("fill_level",)

    def _setup(self) -> None:
        r = self.rng
        self.rate_per_day = r.uniform(0.12, 0.3)
        self.collection_days = r.choice(((0, 3), (1, 4), (2, 5), (0, 2, 4)))
        self.collection_hour = r.uniform(5.5, 9.0)
        self.fill = r.uniform(0.05, 0.5)
        self._day: int | None = None
        self._day_factor = 1.0

    def sample(self, ts_ms: int) -> dict[str, float]:
        ts = ts_ms / 1000.0
        dt = float(self.interval_s)
        now = _local_seconds(ts)
        before = _local_seconds(ts - dt)
        lday = int(now // _DAY_S)
        if lday != self._day:
            self._day = lday
            self._day_factor = math.exp(self.rng.gauss(0.0, 0.2) - 0.02)
        hour_mid = ((before + now) / 2.0 % _DAY_S) / 3600.0
        weekend = 1.25 if (lday + 3) % 7 >= 5 else 1.0
        increment = (
            self.rate_per_day
            * self._day_factor
            * weekend
            * self.weather.factor(ts, _WEATHER_DAMPING)
            * _waste_activity(hour_mid)
            / _WASTE_ACTIVITY_MEAN
            * dt
            / _DAY_S
        )
        collected_at = None
        for d in range(int(before // _DAY_S), lday + 1):
            moment = d * _DAY_S + self.collection_hour * 3600.0
            if before < moment <= now and (d + 3) % 7 in self.collection_days:
                collected_at = moment
        if collected_at is None:
            self.fill = min(1.0, self.fill + increment)
        else:
            share_after = (now - collected_at) / (now - before) if now > before else 0.0
            self.fill = min(1.0, self.rng.uniform(0.0, 0.03) + increment * share_after)
        level = self.fill * self.drift(ts_ms) * self.effects_at(ts_ms)["fill_level"] + self.rng.gauss(0.0, 0.01)
        return {"fill_level": _clip("fill_level", level)}


MODELS: dict[str, type[DeviceModel]] = {
    m.kind: m
    for m in (
        AirQualityModel,
        TrafficCounterModel,
        ParkingModel,
        NoiseModel,
        StreetLightModel,
        EMobilityModel,
        WasteBinModel,
    )
}


# --- whole experiments ----------------------------------------------------------------------


def _weather_for(exp: Experiment, seed: int, sd: float) -> Weather:
    anchor = int(exp.periods.baseline.start.timestamp()) // 3600 * 3600
    return Weather(derive_seed(seed, exp.id, "weather"), anchor, sd=sd)


def build_models(exp: Experiment, seed: int) -> dict[str, DeviceModel]:
    """A fresh model for every device of ``exp`` (device id → model), sharing one weather
    and one trend; an experiment without a ``simulation`` section gets its defaults."""
    sim = exp.simulation if exp.simulation is not None else Simulation()
    weather = _weather_for(exp, seed, sim.weather_sd)
    intervention_ms = to_ms(exp.periods.intervention.start)
    span = (to_ms(exp.periods.baseline.start), to_ms(exp.periods.intervention.end))
    return {
        d.id: MODELS[d.kind](
            d,
            location=device_location(exp, d),
            intervention_start_ms=intervention_ms,
            true_effects=sim.true_effects,
            rng=random.Random(derive_seed(seed, exp.id, d.id)),
            weather=weather,
            drift_rng=random.Random(derive_seed(seed, exp.id, d.id, "drift")),
            noise_sd=sim.device_noise_sd,
            noise_correlation_s=sim.device_noise_correlation,
            trend=sim.trend,
            trend_span_ms=span,
        )
        for d in exp.devices
    }


def _merged(models: dict[str, DeviceModel], start_ms: int, end_ms: int) -> Iterator[Sample]:
    """The devices' readings over ``[start_ms, end_ms)`` in timestamp order, ties in the
    order of ``models``. The devices that share an interval are due together: one heap entry
    per distinct interval rather than per device keeps the cost per reading low."""
    if start_ms >= end_ms:
        return
    ids = list(models)
    samplers = [m.sample for m in models.values()]
    seqs = [0] * len(ids)
    by_step: dict[int, list[int]] = {}
    for i, m in enumerate(models.values()):
        by_step.setdefault(m.interval_s * 1000, []).append(i)
    due_together: dict[tuple[int, ...], list[int]] = {}
    heap = [(start_ms, step) for step in by_step]
    heapq.heapify(heap)
    while heap:
        ts = heap[0][0]
        steps = []
        while heap and heap[0][0] == ts:
            _, step = heapq.heappop(heap)
            steps.append(step)
            if ts + step < end_ms:
                heapq.heappush(heap, (ts + step, step))
        if len(steps) == 1:
            due = by_step[steps[0]]
        else:
            key = tuple(sorted(steps))
            due = due_together.get(key)
            if due is None:
                due = due_together[key] = sorted(i for step in key for i in by_step[step])
        for i in due:
            seq = seqs[i]
            seqs[i] = seq + 1
            yield Sample(ids[i], seq, ts, samplers[i](ts))


def _as_ms(value: datetime, name: str) -> int:
    if value.tzinfo is None:
        raise ValueError(f"{name} must be timezone-aware, e.g. datetime(..., tzinfo=UTC)")
    return to_ms(value)


def simulate_experiment(
    exp: Experiment, seed: int, start: datetime | None = None, end: datetime | None = None
) -> Iterator[Sample]:
    """Every device's readings at its interval over ``[start, end)`` — by default from the
    baseline start to the intervention end — merged in timestamp order (ties in manifest
    device order), ``seq`` counting from 0 per device. The same seed gives the same
    sequence. Lazy: samples are generated as the iterator is consumed."""
    start_ms = _as_ms(exp.periods.baseline.start if start is None else start, "start")
    end_ms = _as_ms(exp.periods.intervention.end if end is None else end, "end")
    merged = _merged(build_models(exp, seed), start_ms, end_ms)
    outages = exp.simulation.outages if exp.simulation else ()
    if not outages:
        return merged
    # a device in an outage sends nothing: its readings of the window are never taken out of
    # the street (the models still run through it, so what comes after is unchanged)
    base_ms = _as_ms(exp.periods.baseline.start, "baseline start")
    silent: dict[str, list[tuple[int, int]]] = {}
    for o in outages:
        silent.setdefault(o.device, []).append((base_ms + o.start * 1000, base_ms + (o.start + o.duration) * 1000))
    return (s for s in merged if not any(a <= s.ts_ms < b for a, b in silent.get(s.device_id, ())))
