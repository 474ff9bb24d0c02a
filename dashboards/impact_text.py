"""How an impact KPI reads for people: its estimate in the right scale, its verdict, its
devices per group and its warnings as sentences. One place for the HTML report, the demo's
terminal and JSON output, and the Grafana panels' SQL (:mod:`dashboards.impact_sql`).

An impact is stored by the streams worker as ``kpi_values.details`` =
:meth:`streams.impact.ImpactResult.as_dict`: ``estimate``/``ci_low``/``ci_high`` are a
relative change (−0.25 = −25%) when ``scale`` is ``relative``, a difference in ``unit`` when
it is ``absolute`` (°C, dB(A): metrics without a true zero).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from pilotlab.contracts import IMPACT_WARNINGS as WARNINGS
from pilotlab.metrics import METRICS

VERDICTS = ("improved", "worsened", "no clear effect", "inconclusive")

# one colour per verdict (the report's CSS and SVG) and the Grafana palette names for the same
VERDICT_COLOURS = {
    "improved": "#1a7f37",
    "worsened": "#c62828",
    "no clear effect": "#4b5563",
    "inconclusive": "#b45309",
}
GRAFANA_VERDICT_COLOURS = {
    "improved": "green",
    "worsened": "red",
    "no clear effect": "blue",
    "inconclusive": "orange",
}
# a symbol next to each verdict, so that it does not rest on colour alone
VERDICT_SYMBOLS = {"improved": "✓", "worsened": "✗", "no clear effect": "=", "inconclusive": "?"}


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def pct(v: float | None, digits: int = 1) -> str:
    """A relative change as a signed percentage: −0.291 → ``-29.1%``; zero unsigned."""
    if not _finite(v):
        return "—"
    return f"{0.0:.{digits}f}%" if round(v * 100, digits) == 0 else f"{v * 100:+.{digits}f}%"


def decimals(*values: float | None) -> int:
    """Decimals that give the largest of ``values`` three significant digits (0 to 4)."""
    m = max((abs(v) for v in values if _finite(v)), default=0.0)
    if m == 0:
        return 2
    return max(0, min(4, 2 - math.floor(math.log10(m))))


def effect(v: float | None, scale: str | None, unit: str | None, digits: int | None = None) -> str:
    """An effect in its scale: ``-29.1%`` (relative), ``+1.02 degC`` (absolute, in the unit)."""
    if scale != "absolute":
        return pct(v)
    if not _finite(v):
        return "—"
    d = decimals(v) if digits is None else digits
    text = f"{0.0:.{d}f}" if round(v, d) == 0 else f"{v:+.{d}f}"
    return f"{text} {unit}" if unit else text


def interval(lo: float | None, hi: float | None, scale: str | None, unit: str | None,
             estimate: float | None = None) -> str:
    """A 95% interval in its scale, ``-33.0% … -25.0%``; absolute bounds share their decimals
    (and those of ``estimate``), the unit is written once at the end."""
    if not (_finite(lo) and _finite(hi)):
        return "—"
    if scale != "absolute":
        return f"{pct(lo)} … {pct(hi)}"
    d = decimals(lo, hi, estimate)
    return f"{effect(lo, scale, None, d)} … {effect(hi, scale, None, d)}" + (f" {unit}" if unit else "")


def estimate_with_interval(details: Mapping, level_label: bool = True, digits: int | None = None) -> str:
    """``-29.1% [95% CI -33.0% … -25.0%]``, or ``+1.02 degC [95% CI +0.40 … +1.64 degC]``;
    the estimate alone when there is no interval. ``digits``: the decimals of an absolute
    effect (default: three significant digits of the largest of the three numbers)."""
    est, lo, hi = details.get("estimate"), details.get("ci_low"), details.get("ci_high")
    scale, unit = details.get("scale", "relative"), details.get("unit")
    d = (decimals(est, lo, hi) if digits is None else digits) if scale == "absolute" else None
    text = effect(est, scale, unit, d)
    if _finite(lo) and _finite(hi):
        label = f"{round(100 * details.get('level', 0.95)):g}% CI " if level_label else ""
        bounds = f"{effect(lo, scale, None, d)} … {effect(hi, scale, unit, d)}" if scale == "absolute" else \
            interval(lo, hi, scale, unit)
        text += f" [{label}{bounds}]"
    return text


def scale_label(scale: str | None, unit: str | None) -> str:
    """What the numbers are: ``relative change (%)`` or ``difference in dB(A)``."""
    return "relative change (%)" if scale != "absolute" else f"difference in {unit or 'the unit'}"


def devices(counts: Mapping[str, int] | None, design: str | None = None) -> str:
    """``6 vs 6 devices`` (treatment vs control), ``6 devices, no control group``."""
    counts = counts or {}
    t, c = int(counts.get("treatment", 0) or 0), int(counts.get("control", 0) or 0)
    if design == "before-after" or (design is None and not c):
        return f"{t} device{'s' if t != 1 else ''}, no control group"
    return f"{t} vs {c} devices"


def sentences(codes: Iterable[str] | None) -> list[str]:
    """The plain sentence of each warning code (an unknown code is shown as it is)."""
    return [WARNINGS.get(c, c) for c in codes or ()]


def metric_scale(metric: str) -> tuple[str, str | None]:
    """The scale an effect on ``metric`` is stated in — a simulation's true effect, or an
    impact that could be computed as designed: ``("relative", None)`` for a ratio-scale metric,
    ``("absolute", unit)`` for an interval-scale one (°C, dB(A))."""
    m = METRICS.get(metric)
    if m is not None and m.scale == "interval":
        return "absolute", m.unit
    return "relative", None


def verdict_of(details: Mapping | None) -> str:
    """The stored verdict; ``inconclusive`` for a row without one (nothing computed yet)."""
    v = (details or {}).get("verdict")
    return v if v in VERDICTS else "inconclusive"
