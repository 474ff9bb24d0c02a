"""Ground truth for simulated pilots: the effect the pipeline should recover.

:func:`expected_effect` is the true relative effect written in the manifest;
:func:`did_from_samples` is the difference-in-differences of means computed directly from
simulated samples, with no pipeline in between, for tests to compare with the pipeline's
KPIs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pilotlab.contracts import to_ms
from pilotlab.manifest import Experiment
from simulators.models import Sample

__all__ = ["GroupMeans", "did_from_samples", "expected_effect", "group_means"]


def expected_effect(exp: Experiment, metric: str) -> float:
    """The true relative effect on ``metric`` for treatment devices (0.0 when none is set)."""
    if exp.simulation is None:
        return 0.0
    return float(exp.simulation.true_effects.get(metric, 0.0))


@dataclass(frozen=True, slots=True)
class GroupMeans:
    """Mean of one metric per group and period; ``None`` where there were no samples."""

    treatment_baseline: float | None
    treatment_intervention: float | None
    control_baseline: float | None
    control_intervention: float | None
    counts: dict[str, int]  # "treatment_baseline" → number of samples, …


def group_means(exp: Experiment, samples: Iterable[Sample], metric: str) -> GroupMeans:
    """Means of ``metric`` by group (treatment/control) and period (baseline/intervention).

    Samples outside both periods, or without ``metric``, are left out. A sample from a
    device that is not in ``exp`` is an error.
    """
    groups = {d.id: d.group for d in exp.devices}
    b0, b1 = to_ms(exp.periods.baseline.start), to_ms(exp.periods.baseline.end)
    i0, i1 = to_ms(exp.periods.intervention.start), to_ms(exp.periods.intervention.end)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for s in samples:
        group = groups.get(s.device_id)
        if group is None:
            raise ValueError(f"sample from device {s.device_id!r}, which is not in experiment {exp.id!r}")
        value = s.metrics.get(metric)
        if value is None:
            continue
        if b0 <= s.ts_ms < b1:
            cell = f"{group}_baseline"
        elif i0 <= s.ts_ms < i1:
            cell = f"{group}_intervention"
        else:
            continue
        sums[cell] = sums.get(cell, 0.0) + value
        counts[cell] = counts.get(cell, 0) + 1

    def mean(cell: str) -> float | None:
        return sums[cell] / counts[cell] if counts.get(cell) else None

    return GroupMeans(
        treatment_baseline=mean("treatment_baseline"),
        treatment_intervention=mean("treatment_intervention"),
        control_baseline=mean("control_baseline"),
        control_intervention=mean("control_intervention"),
        counts=counts,
    )


def _ratio(after: float | None, before: float | None, what: str, metric: str) -> float:
    if after is None or before is None:
        raise ValueError(f"no {what} samples of {metric!r} in one of the periods")
    if before == 0:
        raise ValueError(f"the {what} baseline mean of {metric!r} is 0: a relative change is undefined")
    return after / before


def did_from_samples(exp: Experiment, samples: Iterable[Sample], metric: str) -> float:
    """Relative difference-in-differences of means of ``metric``:
    ``(T_int / T_base) / (C_int / C_base) - 1``, or ``T_int / T_base - 1`` when the
    experiment has no control device. Raises ``ValueError`` when a needed mean is missing
    or a baseline mean is 0."""
    m = group_means(exp, samples, metric)
    treatment = _ratio(m.treatment_intervention, m.treatment_baseline, "treatment", metric)
    if not any(d.group == "control" for d in exp.devices):
        return treatment - 1.0
    control = _ratio(m.control_intervention, m.control_baseline, "control", metric)
    if control == 0:
        raise ValueError(f"the control intervention mean of {metric!r} is 0: the DiD is undefined")
    return treatment / control - 1.0
