"""The impact estimator pilotlab used until December 2026, kept only so that ``make
bench-impact`` can show it beside the device-level one on the same pilots.

Reading-level difference-in-differences of means with a 95% CI from the normal
distribution: every reading counted as an independent observation (delta method on the
log of each cell mean for the relative effect; √Σ s²/n for the absolute one). On
autocorrelated sensors that share weather it is far too narrow.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from statistics import NormalDist

from pilotlab.contracts import to_ms
from pilotlab.manifest import Experiment

Z95 = NormalDist().inv_cdf(0.975)


def legacy_estimate(experiment: Experiment, readings: Iterable[tuple[str, int, float]]) -> dict:
    """``{"relative": (est, lo, hi) | None, "absolute": (est, lo, hi) | None}``."""
    p = experiment.periods
    base = (to_ms(p.baseline.start), to_ms(p.baseline.end))
    inter = (to_ms(p.intervention.start), to_ms(p.intervention.end))
    group = {d.id: d.group for d in experiment.devices}
    has_control = "control" in group.values()
    cells: dict[tuple[str, str], list[float]] = {}  # [n, sum, sum of squares]
    for dev, ts, v in readings:
        period = "b" if base[0] <= ts < base[1] else "i" if inter[0] <= ts < inter[1] else None
        if period is None:
            continue
        c = cells.setdefault((group[dev], period), [0, 0.0, 0.0])
        c[0] += 1
        c[1] += v
        c[2] += v * v
    groups = ("treatment", "control") if has_control else ("treatment",)
    stats = {}
    for g in groups:
        for per in ("b", "i"):
            n, s, ss = cells.get((g, per), [0, 0.0, 0.0])
            if n < 2:
                return {"relative": None, "absolute": None}
            mean = s / n
            stats[g, per] = (n, mean, max(0.0, (ss - n * mean * mean) / (n - 1)))
    sign = {"treatment": 1, "control": -1}
    diff = sum(sign[g] * (stats[g, "i"][1] - stats[g, "b"][1]) for g in groups)
    se_abs = math.sqrt(sum(v / n for n, _, v in stats.values()))
    out = {"absolute": (diff, diff - Z95 * se_abs, diff + Z95 * se_abs), "relative": None}
    if all(m > 0 for _, m, _ in stats.values()):
        log_est = sum(sign[g] * (math.log(stats[g, "i"][1]) - math.log(stats[g, "b"][1])) for g in groups)
        se = math.sqrt(sum(v / (n * m * m) for n, m, v in stats.values()))
        out["relative"] = tuple(math.expm1(x) for x in (log_est, log_est - Z95 * se, log_est + Z95 * se))
    return out
