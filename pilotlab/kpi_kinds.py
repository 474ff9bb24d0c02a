"""The KPI kinds: one registry of their names, their manifest parameters and how their values
are read (docs/experiments.md, "One registry of kinds").

This is the ground floor's half of the registry: what a manifest may name and what the read
side needs to know about a kind. The aggregators that compute each kind live in the streams
layer (``streams.kpis.REGISTRY``, one per name here; ``tests/unit/test_kpi_kinds.py`` proves
it), the manifest validates a KPI against :data:`KINDS`, the SQL period summary folds windows
by :attr:`Kind.period_fold` (migration 0040; ``tests/unit/test_kpi_registry.py`` proves the
SQL agrees) and the report labels and charts by :attr:`Kind.level` and :attr:`Kind.chart`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PeriodFold = Literal["sum", "weighted_mean", "min", "max", "pooled", "window_mean"]


@dataclass(frozen=True, slots=True)
class Param:
    """A manifest field of a KPI that only some kinds take."""

    name: str
    example: str  # shown in the error when a required parameter is missing
    required: bool = True  # required parameters also change what the KPI computes (its signature)


@dataclass(frozen=True, slots=True)
class Kind:
    """One KPI kind.

    ``period_fold`` says how the windows of a period fold into one value (SQL function
    ``kpi_period_summary``): ``sum`` adds the window values, ``weighted_mean`` weights them by
    samples, ``min``/``max`` take the extreme, ``pooled`` divides the sums of two counts kept
    in each window's details (``pooled`` = (numerator, denominator) keys: exact), and
    ``window_mean`` averages the window values (a quantile of windows cannot be pooled
    exactly). ``None``: the kind has no windows to fold (impact: one state per experiment).
    """

    name: str
    description: str
    params: tuple[Param, ...] = ()
    windowed: bool = True
    period_fold: PeriodFold | None = "window_mean"
    pooled: tuple[str, str] | None = None
    # a level of the metric, in its unit: for metrics without a true zero (°C, dB(A)) its change
    # between periods is a difference, not a ratio
    level: bool = False
    # the report draws its baseline and intervention as bars
    chart: bool = False

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


_KINDS = (
    Kind("count", "number of samples in the window", period_fold="sum"),
    Kind("sum", "sum of the values (Kahan-compensated)", period_fold="sum"),
    Kind("mean", "mean of the values", period_fold="weighted_mean", level=True, chart=True),
    Kind("min", "smallest value", period_fold="min", level=True),
    Kind("max", "largest value", period_fold="max", level=True),
    Kind(
        "quantile",
        "q-quantile of the values (mergeable sketch, 1% relative error)",
        params=(Param("q", "0.95"),),
        level=True,
        chart=True,
    ),
    Kind(
        "exceedance",
        "share of samples strictly above threshold",
        params=(Param("threshold", "25"),),
        period_fold="pooled",
        pooled=("above", "samples"),
        chart=True,
    ),
    Kind("availability", "share of the group's registered devices reporting in the window", chart=True),
    Kind(
        "completeness",
        "received / expected samples (from the devices' declared intervals)",
        period_fold="pooled",
        pooled=("received", "expected"),
        chart=True,
    ),
    Kind("freshness", "p95 of the ingest delay (received - ts), in seconds"),
    Kind(
        "impact",
        "device-level difference-in-differences over the periods, 95% CI and verdict",
        params=(Param("expected_effect", "-0.2", required=False), Param("change_sd", "0.1", required=False)),
        windowed=False,
        period_fold=None,
    ),
)

KINDS: dict[str, Kind] = {k.name: k for k in _KINDS}
KIND_NAMES: tuple[str, ...] = tuple(KINDS)
WINDOWED: tuple[str, ...] = tuple(k.name for k in _KINDS if k.windowed)
# every parameter some kind takes (a manifest field of Kpi)
PARAMS: tuple[str, ...] = tuple(dict.fromkeys(p.name for k in _KINDS for p in k.params))

KpiKind = Literal[KIND_NAMES]  # type: ignore[valid-type]  # the manifest's allowed kinds


def parameter_problems(kind: str, values: dict[str, object]) -> list[str]:
    """What is wrong with a KPI's kind-specific parameters (``values``: every name in
    :data:`PARAMS` → the manifest's value or None)."""
    spec = KINDS[kind]
    problems = []
    for p in spec.params:
        if p.required and values.get(p.name) is None:
            article = "an" if kind[0] in "aeiou" else "a"
            problems.append(f"{article} {kind} KPI needs {p.name}, e.g. {p.name}: {p.example}")
    for name in PARAMS:
        if values.get(name) is not None and spec.param(name) is None:
            owners = " or ".join(k.name for k in _KINDS if k.param(name) is not None)
            problems.append(f"{name} applies to {owners} KPIs only, not {kind}")
    return problems


def signature(kind: str, values: dict[str, object]) -> str:
    """What a KPI computes: its kind and the values of its required parameters."""
    spec = KINDS[kind]
    return ":".join([kind, *(repr(values[p.name]) for p in spec.params if p.required)])
