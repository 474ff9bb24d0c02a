"""The impact of a pilot: device-level difference-in-differences with an honest 95% interval.

Readings from one street sensor are not independent: neighbouring readings share the
sensor's slow drift, and every sensor of a pilot shares the weather, the season and the
city's trends. An interval that counts readings as independent observations is far too
narrow (its 95% covered the truth 60–90% of the time on realistic pilots). The unit of
inference here is the **device**:

1. For each device, the mean of the metric in the baseline and in the intervention period.
2. Each device's change between the periods: ``log(intervention mean / baseline mean)`` for
   ratio-scale metrics (a relative effect), ``intervention mean − baseline mean`` for
   interval-scale metrics such as °C and dB(A) (an absolute effect, in the metric's unit).
3. The effect is the mean change of the treatment devices minus the mean change of the
   control devices; its 95% interval is Student's t-interval across devices, with
   n_T + n_C − 2 degrees of freedom (the standard error is the larger of the pooled and the
   unpooled one when the groups differ in size). Shared weather and trends cancel between the groups; a device's own
   level cancels in its change; its autocorrelated noise is inside the spread of the
   changes, which the interval uses — whatever the number of readings.

This is the "collapse to one observation per unit and period" estimator recommended for
difference-in-differences with few, serially correlated units (Bertrand, Duflo &
Mullainathan 2004, QJE 119(1); Donald & Lang 2007, REStat 89(2), whose t with G − 2 degrees
of freedom keeps its level with as few as three devices per group; Welch's 1947 interval is
1–2 points conservative there, which is why it is not the default). With a single device in one group,
the spread comes from the other group alone (Crawford & Howell 1998: one case against a
small control sample), and no verdict is given. Relative effects are ``exp(Δ) − 1``: the
ratio of geometric means of the devices' before/after ratios, minus one.

The verdict (``improved`` / ``worsened`` / ``no clear effect`` / ``inconclusive``) is given
only when the design can carry it: a control group, at least two devices in each group,
each period at least ``MIN_PERIOD_DAYS`` days long, a baseline that passes its placebo
check (its second half compared with its first shows no effect), and the intervention over (no
verdict before the planned end, so that watching the pilot every day cannot inflate false
alarms: the interval shown meanwhile is the fixed-sample one, labelled ``interim``). Every
reason a verdict is withheld or weakened is a machine-readable code in ``warnings``
(:data:`pilotlab.contracts.IMPACT_WARNINGS`).

The state is mergeable and small (a few numbers per device): the streams worker keeps it
per experiment and KPI and recomputes the result at each revision; :func:`estimate_impact`
folds the same state from a plain list, so both give the same result on the same readings.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Literal

from scipy import stats

from pilotlab.contracts import MIN_PERIOD_DAYS, to_ms
from pilotlab.manifest import Experiment, Kpi
from pilotlab.metrics import METRICS

LEVEL = 0.95
LOW_COMPLETENESS = 0.5  # a device with fewer than half its expected readings in a period

Verdict = Literal["improved", "worsened", "no clear effect", "inconclusive"]


# --- state: per device, readings and their sum in three cells --------------------------------
# state = {"t": newest ts added (ms) or None, "d": {device_id: [group, n_b1, s_b1, n_b2, s_b2, n_i, s_i]}}
# b1 / b2: the first and second half of the baseline (their union is the baseline: the
# placebo check compares them); i: the intervention period. Group is "treatment"/"control".

_CELL = {"b1": 1, "b2": 3, "i": 5}


def _empty_row(group: str) -> list:
    return [group, 0, 0.0, 0, 0.0, 0, 0.0]


def initialize() -> dict:
    return {"t": None, "d": {}}


@dataclass(frozen=True, slots=True)
class Design:
    """What the analysis needs of an experiment and a KPI."""

    baseline: tuple[int, int]
    intervention: tuple[int, int]
    expected: Mapping[str, float]  # device id -> expected readings per full period
    scale: Literal["relative", "absolute"]
    unit: str
    better: Literal["lower", "higher"]
    end_slack_ms: int  # the intervention counts as over once a reading this close to its end arrived

    @property
    def baseline_mid(self) -> int:
        return (self.baseline[0] + self.baseline[1]) // 2

    def cell(self, ts_ms: int) -> str | None:
        if self.baseline[0] <= ts_ms < self.baseline[1]:
            return "b1" if ts_ms < self.baseline_mid else "b2"
        if self.intervention[0] <= ts_ms < self.intervention[1]:
            return "i"
        return None


def design(experiment: Experiment, kpi: Kpi) -> Design:
    p = experiment.periods
    base = (to_ms(p.baseline.start), to_ms(p.baseline.end))
    inter = (to_ms(p.intervention.start), to_ms(p.intervention.end))
    metric = METRICS[kpi.metric]
    max_interval = max(d.interval for d in experiment.devices)
    return Design(
        baseline=base,
        intervention=inter,
        expected={d.id: (base[1] - base[0]) / 1000 / d.interval for d in experiment.devices},
        scale="relative" if metric.scale == "ratio" else "absolute",
        unit=metric.unit,
        better=kpi.better,
        end_slack_ms=max(2 * max_interval, 3600) * 1000,
    )


def add(state: dict, design_: Design, device_id: str, group: str, ts_ms: int, value: float) -> dict:  # noqa: PLR0917 - one reading
    """Add one reading; updates ``state`` in place (a worker's state is its own decoded copy)
    and returns it. Readings outside both periods are not part of the impact."""
    return add_all(state, design_, device_id, group, [ts_ms], [value])


def add_all(state: dict, design_: Design, device_id: str, group: str, stamps: list[int], values: list[float]) -> dict:  # noqa: PLR0917 - one message
    """``add`` of each (ts, value) of one device's message in order (the same sums, added in
    the same order), the device's row looked up once; updates ``state`` in place."""
    row, newest = None, state["t"]
    for ts_ms, value in zip(stamps, values, strict=True):
        cell = design_.cell(ts_ms)
        if cell is None:
            continue
        if row is None:
            row = state["d"].get(device_id)
            if row is None:
                row = state["d"][device_id] = _empty_row(group)
        i = _CELL[cell]
        row[i] += 1
        row[i + 1] += value
        if newest is None or ts_ms > newest:
            newest = ts_ms
    state["t"] = newest
    return state


def state_from_cells(cells: Iterable) -> dict:
    """A state from per-device cell totals, as a database aggregates stored readings
    (``storage.queries.impact_device_periods``: device_id, device_group, cell, readings,
    total). The newest reading time is not known from totals (``t`` stays None)."""
    state: dict = {"t": None, "d": {}}
    for c in cells:
        row = state["d"].setdefault(c.device_id, _empty_row(c.device_group))
        i = _CELL[c.cell]
        row[i] += c.readings
        row[i + 1] += c.total
    return state


def merge(a: dict, b: dict) -> dict:
    """The state of the union of two sets of readings (neither input is changed)."""
    out = {"t": max((t for t in (a["t"], b["t"]) if t is not None), default=None), "d": {}}
    for src in (a, b):
        for dev, row in src["d"].items():
            have = out["d"].get(dev)
            out["d"][dev] = (
                list(row) if have is None else [have[0], *(x + y for x, y in zip(have[1:], row[1:], strict=True))]
            )
    return out


# --- the result ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Interval:
    estimate: float
    ci_low: float | None
    ci_high: float | None


@dataclass(frozen=True, slots=True)
class ImpactResult:
    """The impact of one KPI. ``estimate``/``ci_low``/``ci_high`` are a relative change
    (−0.25 = −25%) when ``scale`` is ``relative``, a difference in ``unit`` when ``absolute``.
    ``devices`` counts the devices analysed per group; ``readings`` the readings per group
    and period; ``placebo`` is the same analysis of the baseline's second half against its
    first, which should show no effect."""

    estimate: float | None
    ci_low: float | None
    ci_high: float | None
    scale: Literal["relative", "absolute"]
    unit: str | None
    verdict: Verdict
    warnings: tuple[str, ...]
    devices: dict[str, int]
    method: str
    design: Literal["difference-in-differences", "before-after"]
    final: bool
    level: float = LEVEL
    se: float | None = None
    df: float | None = None
    p_value: float | None = None
    placebo: Interval | None = None
    readings: dict[str, dict[str, int]] = field(default_factory=dict)
    mean: dict[str, dict[str, float | None]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["warnings"] = list(self.warnings)
        return d


def _two_sample(a: list[float], b: list[float]) -> tuple[float, float | None, float | None]:
    """mean(a) − mean(b), its standard error and degrees of freedom (Student, n_a + n_b − 2;
    the standard error is the larger of the pooled and the unpooled one, so a smaller group
    with a larger spread cannot shrink it). Without ``b``: a one-sample interval. With a
    group of one, the other group's spread stands for both (df of that group); with neither
    group replicated: no interval (None, None)."""
    diff = _mean(a) - (_mean(b) if b else 0.0)
    na, nb = len(a), len(b)
    if not b:  # before/after: a one-sample interval
        if na < 2:
            return diff, None, None
        return diff, math.sqrt(_var(a) / na), na - 1
    if na >= 2 and nb >= 2:
        va, vb = _var(a), _var(b)
        pooled = ((na - 1) * va + (nb - 1) * vb) / (na + nb - 2) * (1 / na + 1 / nb)
        return diff, math.sqrt(max(pooled, va / na + vb / nb)), na + nb - 2
    if na + nb >= 3:  # one group of one: the other group's spread for both (Crawford & Howell)
        rep = a if na >= 2 else b
        return diff, math.sqrt(_var(rep) * (1 / na + 1 / nb)), len(rep) - 1
    return diff, None, None


def _mean(x: list[float]) -> float:
    return math.fsum(x) / len(x)


def _var(x: list[float]) -> float:
    m = _mean(x)
    return math.fsum((v - m) ** 2 for v in x) / (len(x) - 1)


def _interval(diff: float, se: float | None, df: float | None, relative: bool) -> Interval:
    if se is None or df is None:
        lo = hi = None
    else:
        half = float(stats.t.ppf(0.5 + LEVEL / 2, df)) * se
        lo, hi = diff - half, diff + half
    if relative:
        return Interval(
            math.expm1(diff), None if lo is None else math.expm1(lo), None if hi is None else math.expm1(hi)
        )
    return Interval(diff, lo, hi)


def _changes(rows: dict, first: tuple[int, ...], second: tuple[int, ...], relative: bool) -> dict[str, list[float]]:
    """Per group, each device's change from the ``first`` cells to the ``second`` (indices
    of the state row), for devices with readings in both."""
    out: dict[str, list[float]] = {"treatment": [], "control": []}
    for row in rows.values():
        n1, s1 = sum(row[i] for i in first), sum(row[i + 1] for i in first)
        n2, s2 = sum(row[i] for i in second), sum(row[i + 1] for i in second)
        if n1 == 0 or n2 == 0:
            continue
        m1, m2 = s1 / n1, s2 / n2
        out[row[0]].append(math.log(m2 / m1) if relative else m2 - m1)
    return out


_B, _B1, _B2, _I = (1, 3), (1,), (3,), (5,)


def analyse(state: dict, d: Design, has_control: bool) -> ImpactResult:
    """The impact from a state (see the module's description)."""
    rows: dict[str, list] = state["d"]
    warnings: list[str] = []
    both = {dev: row for dev, row in rows.items() if (row[1] + row[3]) and row[5]}
    if len(both) < len(rows):
        warnings.append("devices_excluded")
    if any(min(row[1] + row[3], row[5]) < LOW_COMPLETENESS * d.expected.get(dev, 0) for dev, row in both.items()):
        warnings.append("low_completeness")
    relative = d.scale == "relative"
    if relative and any(
        row[i + 1] <= 0 for row in both.values() for i in (1, 3, 5) if row[i]
    ):  # a mean that is not positive: no log
        relative = False
        warnings.append("relative_undefined")
    groups = ("treatment", "control") if has_control else ("treatment",)
    counts = {g: sum(1 for r in both.values() if r[0] == g) for g in ("treatment", "control")}
    readings = {
        g: {
            "baseline": sum(r[1] + r[3] for r in rows.values() if r[0] == g),
            "intervention": sum(r[5] for r in rows.values() if r[0] == g),
        }
        for g in groups
    }
    means = {
        g: {
            p: (
                math.fsum(r[i + 1] for r in rows.values() if r[0] == g for i in cells) / readings[g][p]
                if readings[g][p]
                else None
            )
            for p, cells in (("baseline", (1, 3)), ("intervention", (5,)))
        }
        for g in groups
    }
    final = state["t"] is not None and state["t"] >= d.intervention[1] - d.end_slack_ms
    scale = "relative" if relative else "absolute"
    unit = None if relative else d.unit
    dsg = "difference-in-differences" if has_control else "before-after"
    method = (
        f"device-level {dsg}: per device the change of its period mean"
        f" ({'log ratio' if relative else 'difference, in ' + d.unit}),"
        + (" treatment minus control, t-interval across devices" if has_control
           else " t-interval across treatment devices (no control group)")
    )  # fmt: skip

    def result(verdict: Verdict, est: Interval | None = None, **kw) -> ImpactResult:
        return ImpactResult(
            estimate=est.estimate if est else None,
            ci_low=est.ci_low if est else None,
            ci_high=est.ci_high if est else None,
            scale=scale,
            unit=unit,
            verdict=verdict,
            warnings=tuple(warnings),
            devices=counts,
            method=method,
            design=dsg,
            final=final,
            readings=readings,
            mean=means,
            **kw,
        )

    changes = _changes(both, _B, _I, relative)
    t, c = changes["treatment"], changes["control"] if has_control else []
    if not t or (has_control and not c):
        warnings.insert(0, "no_data")
        return result("inconclusive")
    diff, se, df = _two_sample(t, c)
    est = _interval(diff, se, df, relative)
    p_value = None
    if se is not None and df is not None:
        p_value = 1.0 if se == 0 and diff == 0 else (0.0 if se == 0 else float(2 * stats.t.sf(abs(diff / se), df)))
    placebo_changes = _changes(both, _B1, _B2, relative)
    pt, pc = placebo_changes["treatment"], placebo_changes["control"] if has_control else []
    placebo = None
    if pt and (pc or not has_control):
        pdiff, pse, pdf = _two_sample(pt, pc)
        placebo = _interval(pdiff, pse, pdf, relative)
        if placebo.ci_low is not None and not placebo.ci_low <= (0.0) <= placebo.ci_high:
            warnings.append("placebo_shift")
    if not final:
        warnings.append("interim")
    if not has_control:
        warnings.append("no_control_group")
    if any(counts[g] < 2 for g in groups):
        warnings.append("no_replication")
    elif any(counts[g] < 3 for g in groups):
        warnings.append("few_devices")
    if se is None:
        warnings.append("no_interval")
    days = min(d.baseline[1] - d.baseline[0], d.intervention[1] - d.intervention[0]) / 86_400_000
    if days < MIN_PERIOD_DAYS:
        warnings.append("short_period")
    blocking = {"interim", "no_control_group", "no_replication", "no_interval", "short_period", "placebo_shift"}
    if blocking.intersection(warnings):
        verdict: Verdict = "inconclusive"
    elif est.ci_low <= 0.0 <= est.ci_high:
        verdict = "no clear effect"
    else:
        verdict = "improved" if (est.estimate < 0) == (d.better == "lower") else "worsened"
    return result(verdict, est, se=se, df=df, p_value=p_value, placebo=placebo)


# --- the pure entry point -----------------------------------------------------------------------


def estimate_impact(experiment: Experiment, kpi_name: str, readings: Iterable[tuple[str, int, float]]) -> ImpactResult:
    """The impact of ``experiment``'s KPI ``kpi_name`` from ``(device_id, ts_ms, value)``
    readings of its metric, in any order — the same result the streams worker stores for
    the same readings. A device the experiment does not list is an error (its group is
    unknown)."""
    kpi = next((k for k in experiment.kpis if k.name == kpi_name), None)
    if kpi is None:
        raise KeyError(f"{experiment.id} has no KPI {kpi_name!r}")
    d = design(experiment, kpi)
    state = initialize()
    groups = {dev.id: dev.group for dev in experiment.devices}
    for device_id, ts_ms, value in readings:
        group = groups.get(device_id)
        if group is None:
            raise ValueError(f"device {device_id!r} is not in experiment {experiment.id}")
        add(state, d, device_id, group, int(ts_ms), float(value))
    return analyse(state, d, has_control="control" in groups.values())


# --- planning -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Plan:
    """The smallest effect a design detects with the given power (two-sided test at 1 − LEVEL),
    from the spread of a device's change between two periods without intervention."""

    devices: dict[str, int]
    change_sd: float | None  # on the analysis scale: log ratio (relative) or the unit (absolute)
    source: str  # where change_sd came from
    scale: Literal["relative", "absolute"]
    unit: str | None
    power: float
    mde_decrease: float | None  # the smallest detectable decrease (relative: −0.12 = −12%)
    mde_increase: float | None
    expected_effect: float | None
    warnings: tuple[str, ...]

    def as_dict(self) -> dict:
        d = asdict(self)
        d["warnings"] = list(self.warnings)
        return d


PLAN_WARNINGS: dict[str, str] = {
    "no_control_group": "no control group: no verdict is possible; add comparable control devices",
    "no_replication": "fewer than two devices in a group: no verdict is possible",
    "short_period": f"a period is shorter than {MIN_PERIOD_DAYS:g} days: no verdict is possible",
    "unknown_variability": (
        "variability unknown: state change_sd on the KPI, or collect a baseline first "
        "(pilotlab plan reads it from the database)"
    ),
    "effect_below_mde": "the expected effect is smaller than the minimum detectable effect: the pilot is underpowered",
}


def minimum_detectable(n_t: int, n_c: int, change_sd: float, power: float = 0.8) -> float | None:
    """The smallest true difference in mean device change (on the analysis scale) that the
    two-sample t-test at level 1 − LEVEL detects with probability ``power`` (t approximation with
    n_t + n_c − 2 degrees of freedom, Cohen 1988)."""
    if n_t < 2 or n_c < 2:
        return None
    df = n_t + n_c - 2
    return float((stats.t.ppf(0.5 + LEVEL / 2, df) + stats.t.ppf(power, df)) * change_sd * math.sqrt(1 / n_t + 1 / n_c))


def baseline_change_sd(state: dict, d: Design) -> float | None:
    """The pooled within-group SD of the devices' change from the baseline's first half to
    its second half: a placebo with no intervention. Half periods are noisier than whole ones,
    so this errs on the side of a larger (more cautious) minimum detectable effect."""
    changes = _changes(state["d"], _B1, _B2, d.scale == "relative")
    ss, df = 0.0, 0
    for xs in changes.values():
        if len(xs) >= 2:
            ss += _var(xs) * (len(xs) - 1)
            df += len(xs) - 1
    return math.sqrt(ss / df) if df else None


def plan(experiment: Experiment, kpi: Kpi, *, baseline_state: dict | None = None, power: float = 0.8) -> Plan:
    """The plan of one impact KPI: from ``kpi.change_sd`` when stated, else from a baseline
    already collected (``baseline_state``, as :func:`add` builds it)."""
    d = design(experiment, kpi)
    relative = d.scale == "relative"
    counts = {g: sum(1 for dev in experiment.devices if dev.group == g) for g in ("treatment", "control")}
    warnings: list[str] = []
    if counts["control"] == 0:
        warnings.append("no_control_group")
    if any(n == 1 for n in counts.values()):
        warnings.append("no_replication")
    days = min(d.baseline[1] - d.baseline[0], d.intervention[1] - d.intervention[0]) / 86_400_000
    if days < MIN_PERIOD_DAYS:
        warnings.append("short_period")
    sd, source = kpi.change_sd, "stated in the manifest (change_sd)"
    if sd is None and baseline_state is not None:
        sd = baseline_change_sd(baseline_state, d)
        source = "baseline readings in the database (first vs second half)"
    if sd is None:
        source = "unknown"
        warnings.append("unknown_variability")
    mde = None if sd is None else minimum_detectable(counts["treatment"], counts["control"], sd, power)
    if relative:
        down = None if mde is None else math.expm1(-mde)
        up = None if mde is None else math.expm1(mde)
    else:
        down, up = (None, None) if mde is None else (-mde, mde)
    effect = kpi.expected_effect
    if effect is not None and mde is not None:
        bound = down if effect < 0 else up
        if abs(effect) < abs(bound):
            warnings.append("effect_below_mde")
    return Plan(
        devices=counts,
        change_sd=sd,
        source=source,
        scale=d.scale,
        unit=None if relative else d.unit,
        power=power,
        mde_decrease=down,
        mde_increase=up,
        expected_effect=effect,
        warnings=tuple(warnings),
    )
