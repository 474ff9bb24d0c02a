"""The metric table: every metric pilotlab accepts, its canonical unit and physical range.

A value outside its range is refused with ``value_out_of_range``: it is a broken sensor or
a wrong unit, never a reading to average in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class Metric:
    name: str
    unit: str
    low: float
    high: float
    description: str
    # "ratio": a true zero, so "−20%" means something (NO2, energy, counts); "interval": an
    # arbitrary zero (°C, dB(A), degrees), so changes are differences in the unit
    scale: Literal["ratio", "interval"] = "ratio"


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("pm25", "ug/m3", 0, 1000, "fine particulate matter PM2.5"),
        Metric("pm10", "ug/m3", 0, 2000, "particulate matter PM10"),
        Metric("no2", "ug/m3", 0, 2000, "nitrogen dioxide"),
        Metric("vehicles_per_hour", "veh/h", 0, 20000, "traffic count"),
        Metric("mean_speed", "km/h", 0, 250, "mean vehicle speed"),
        Metric("occupancy", "ratio", 0, 1, "share of parking bays occupied"),
        Metric("noise", "dB(A)", 0, 194, "equivalent sound level", "interval"),
        Metric("energy", "kWh", 0, 100, "street-light energy per sampling interval"),
        Metric("dimming", "ratio", 0, 1, "light output as a share of full power"),
        Metric("trips", "count", 0, 100000, "e-mobility trips in the interval"),
        Metric("lat", "deg", -90, 90, "latitude", "interval"),
        Metric("lon", "deg", -180, 180, "longitude", "interval"),
        Metric("fill_level", "ratio", 0, 1, "waste-bin fill level"),
        Metric("temperature", "degC", -60, 70, "air temperature", "interval"),
    )
}


# --- normalisation: one table for metric names and units ----------------------------------
#
# Devices spell the same quantity in many ways. A metric name is normalised by lower-casing
# it and dropping spaces, ".", "-" and "_" (so "PM2.5", "pm_2.5" and "PM25" all become
# "pm25"), then looking it up in METRIC_ALIASES. A unit is looked up in UNITS and converted
# to the metric's canonical unit with an affine map ``canonical = value * scale + offset``;
# unit spellings are exact (``MG/M3`` is not ``mg/m3``: case carries meaning, M is mega). A
# unit the table does not know, or one that measures another quantity than the metric
# (``km/h`` for ``no2``), is refused with ``unknown_unit``: pilotlab never guesses.


def _squash(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch not in " .-_")


# squashed spelling → canonical metric name (every canonical name maps to itself)
METRIC_ALIASES: dict[str, str] = {
    **{_squash(name): name for name in METRICS},
    "no₂": "no2",
    "nitrogendioxide": "no2",
    "speed": "mean_speed",
    "vehicles": "vehicles_per_hour",
    "vph": "vehicles_per_hour",
    "flow": "vehicles_per_hour",
    "laeq": "noise",
    "soundlevel": "noise",
    "temp": "temperature",
    "airtemperature": "temperature",
    "latitude": "lat",
    "longitude": "lon",
    "fill": "fill_level",
    "filllevel": "fill_level",
}


def canonical_metric(name: str) -> str | None:
    """The canonical metric name for a device's spelling, or None if the table has none."""
    if name in METRICS:
        return name
    if len(name) > 64:
        return None
    return METRIC_ALIASES.get(_squash(name))


@dataclass(frozen=True, slots=True)
class Unit:
    """A unit spelling: which canonical unit it converts to, and how."""

    canonical: str
    scale: float = 1.0
    offset: float = 0.0


UNITS: dict[str, Unit] = {
    # mass concentration → ug/m3
    "ug/m3": Unit("ug/m3"),
    "µg/m³": Unit("ug/m3"),
    "μg/m³": Unit("ug/m3"),  # Greek mu, not the micro sign
    "µg/m3": Unit("ug/m3"),
    "μg/m3": Unit("ug/m3"),
    "ug/m^3": Unit("ug/m3"),
    "mg/m3": Unit("ug/m3", 1000.0),
    "mg/m³": Unit("ug/m3", 1000.0),
    "kg/m3": Unit("ug/m3", 1e9),  # SenML's registered unit for mass concentration
    # traffic
    "veh/h": Unit("veh/h"),
    "vehicles/h": Unit("veh/h"),
    "1/h": Unit("veh/h"),
    "veh/min": Unit("veh/h", 60.0),
    "1/min": Unit("veh/h", 60.0),
    # speed
    "km/h": Unit("km/h"),
    "kmh": Unit("km/h"),
    "m/s": Unit("km/h", 3.6),  # SenML's unit for speed
    "mph": Unit("km/h", 1.609344),
    # ratios
    "ratio": Unit("ratio"),
    "/": Unit("ratio"),  # SenML: ratio
    "%": Unit("ratio", 0.01),  # SenML: percent
    "%RH": Unit("ratio", 0.01),
    # sound level
    "dB(A)": Unit("dB(A)"),
    "dBA": Unit("dB(A)"),
    # energy
    "kWh": Unit("kWh"),
    "Wh": Unit("kWh", 0.001),
    "J": Unit("kWh", 1 / 3.6e6),  # SenML's unit for energy
    # counts
    "count": Unit("count"),
    "1": Unit("count"),
    "trips": Unit("count"),
    # angles
    "deg": Unit("deg"),
    "°": Unit("deg"),
    "lat": Unit("deg"),  # SenML: degrees latitude
    "lon": Unit("deg"),  # SenML: degrees longitude
    # temperature
    "degC": Unit("degC"),
    "°C": Unit("degC"),
    "Cel": Unit("degC"),  # SenML: degrees Celsius
    "K": Unit("degC", 1.0, -273.15),
    "degF": Unit("degC", 5 / 9, -32 * 5 / 9),
    "°F": Unit("degC", 5 / 9, -32 * 5 / 9),
}


def convert(metric: Metric, unit: str, value: float) -> float | None:
    """``value`` given in ``unit`` → the metric's canonical unit, or None when the unit is
    unknown or measures something else."""
    spec = UNITS.get(unit)
    if spec is None or spec.canonical != metric.unit:
        return None
    if spec.scale == 1.0 and spec.offset == 0.0:
        return value
    return value * spec.scale + spec.offset
