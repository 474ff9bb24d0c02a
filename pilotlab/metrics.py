"""The metric table: every metric pilotlab accepts, its canonical unit and physical range.

A value outside its range is refused with ``value_out_of_range``: it is a broken sensor or
a wrong unit, never a reading to average in.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Metric:
    name: str
    unit: str
    low: float
    high: float
    description: str


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("pm25", "ug/m3", 0, 1000, "fine particulate matter PM2.5"),
        Metric("pm10", "ug/m3", 0, 2000, "particulate matter PM10"),
        Metric("no2", "ug/m3", 0, 2000, "nitrogen dioxide"),
        Metric("vehicles_per_hour", "veh/h", 0, 20000, "traffic count"),
        Metric("mean_speed", "km/h", 0, 250, "mean vehicle speed"),
        Metric("occupancy", "ratio", 0, 1, "share of parking bays occupied"),
        Metric("noise", "dB(A)", 0, 194, "equivalent sound level"),
        Metric("energy", "kWh", 0, 100, "street-light energy per sampling interval"),
        Metric("dimming", "ratio", 0, 1, "light output as a share of full power"),
        Metric("trips", "count", 0, 100000, "e-mobility trips in the interval"),
        Metric("lat", "deg", -90, 90, "latitude"),
        Metric("lon", "deg", -180, 180, "longitude"),
        Metric("fill_level", "ratio", 0, 1, "waste-bin fill level"),
        Metric("temperature", "degC", -60, 70, "air temperature"),
    )
}
