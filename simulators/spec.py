"""Scenario files: what to simulate, for how long, with which true effects and which faults.

A scenario is a YAML file validated by pydantic; an error names the file and the field. It
references experiment manifests (paths relative to the scenario file) or embeds them, and
may override, per experiment, the number of devices per group, the sampling interval and the
true effects. Example (``control/examples/scenarios/`` has documented ones)::

    name: lighting-with-faults
    seed: 42
    duration: 2d            # simulated span; the manifests' periods are rescaled onto it
    speed: 3000             # simulated seconds per wall second (1 = live)
    experiments:
      - manifest: ../experiments/adaptive-lighting-borgo-po.yaml
        devices: {treatment: 20, control: 20}
        interval: 15m
        true_effects: {energy: -0.3}
    faults:
      dropout: {rate: 0.02, outages: [{devices: 0.1, start: 6h, duration: 2h}]}
      duplicates: 0.01
      out_of_order: {rate: 0.02, max_delay: 5m}
      late: {rate: 0.005, delay: 2h}
      malformed: 0.01
      clock_skew: {devices: 0.05, offset: 10m}
      bursts: {rate: 0.002, size: 8}

The simulated window always ends at the run's *anchor* (``[anchor - duration, anchor)``):
every experiment's baseline start .. intervention end is mapped linearly onto that window,
so the same scenario runs today, next month, live or ×10,000.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from pilotlab.contracts import Limits
from pilotlab.manifest import (
    Device,
    Experiment,
    Identifier,
    ManifestError,
    Period,
    Periods,
    Seconds,
    Simulation,
    load_manifest,
    parse_duration,
    read_yaml,
)

__all__ = [
    "Bursts",
    "ClockSkew",
    "Delay",
    "Dropout",
    "ExperimentSpec",
    "Faults",
    "IngestLimits",
    "Late",
    "Outage",
    "Scenario",
    "ScenarioError",
    "load_scenario",
    "parse_scenario",
]

Rate = Annotated[float, Field(ge=0.0, le=1.0)]


def _seconds_or_zero(value: object) -> int:
    return 0 if value in (0, "0", "0s") else parse_duration(value)


NonNegSeconds = Annotated[int, BeforeValidator(_seconds_or_zero)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Outage(_Model):
    """A window during which some devices send nothing at all (their readings are lost)."""

    devices: Rate | tuple[Identifier, ...] = Field(description="a share of all devices, or device ids")
    start: NonNegSeconds = Field(default=0, description="offset from the window start")
    duration: Seconds


class Dropout(_Model):
    rate: Rate = 0.0
    outages: tuple[Outage, ...] = ()


class Delay(_Model):
    """Out-of-order delivery: a message is held back by a uniform delay in ``(0, max_delay]``,
    so messages sent after it overtake it."""

    rate: Rate
    max_delay: Seconds = 300


class Late(_Model):
    """Late delivery: a message arrives ``delay`` after it was taken (store-and-forward)."""

    rate: Rate
    delay: Seconds = 7200


class ClockSkew(_Model):
    """A share of devices whose clock is off by ``offset`` (negative: behind)."""

    devices: Rate
    offset: int = Field(description="seconds, or a duration such as '10m' or '-2h'")

    @model_validator(mode="before")
    @classmethod
    def _signed_duration(cls, data: object) -> object:
        if isinstance(data, dict) and isinstance(data.get("offset"), str):
            raw = data["offset"].strip()
            sign = -1 if raw.startswith("-") else 1
            try:
                data = {**data, "offset": sign * parse_duration(raw.lstrip("+-"))}
            except ValueError as exc:
                raise ValueError(f"offset: {exc}") from None
        return data


class Bursts(_Model):
    """Now and then (``rate`` per reading) a device buffers ``size`` readings and sends them
    at once as one JSON array."""

    rate: Rate
    size: int = Field(default=10, ge=2, le=500)


class Faults(_Model):
    dropout: Dropout = Dropout()
    duplicates: Rate = 0.0
    out_of_order: Delay | None = None
    late: Late | None = None
    malformed: Rate = Field(default=0.0, description="share of readings sent as a broken payload")
    clock_skew: ClockSkew | None = None
    bursts: Bursts | None = None


class IngestLimits(_Model):
    """The timestamp window of the ingest the scenario is sent to (``PILOTLAB_INGEST_MAX_AGE_S``,
    ``PILOTLAB_INGEST_MAX_FUTURE_S``): the ground truth classifies timestamps by them."""

    max_age: Seconds = 7 * 86400
    max_future: NonNegSeconds = 300

    def limits(self) -> Limits:
        return Limits(max_age_ms=self.max_age * 1000, max_future_ms=self.max_future * 1000)


class GroupCounts(_Model):
    treatment: int = Field(default=0, ge=0, le=100_000)
    control: int = Field(default=0, ge=0, le=100_000)


class ExperimentSpec(_Model):
    manifest: Path | None = Field(default=None, description="a manifest file, relative to the scenario")
    experiment: dict | None = Field(default=None, description="an embedded manifest")
    devices: GroupCounts | None = Field(
        default=None, description="replace the manifest's devices by this many per group"
    )
    interval: Seconds | None = None
    true_effects: dict[str, float] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ExperimentSpec:
        if (self.manifest is None) == (self.experiment is None):
            raise ValueError("give exactly one of 'manifest' (a path) or 'experiment' (an embedded manifest)")
        return self


class Scenario(_Model):
    name: Identifier
    description: str = ""
    seed: int = 0
    duration: Seconds | None = Field(default=None, description="simulated span; default: the manifests'")
    speed: float = Field(default=1.0, ge=1.0, le=10_000_000, description="1: live; N: N× accelerated")
    batch: int = Field(default=1, ge=1, le=500, description="readings per MQTT message")
    experiments: tuple[ExperimentSpec, ...] = Field(min_length=1)
    faults: Faults = Faults()
    ingest: IngestLimits = IngestLimits()
    # filled in by load_scenario: the resolved manifests (periods as written)
    resolved: tuple[Experiment, ...] = Field(default=(), exclude=True)

    @property
    def experiments_resolved(self) -> tuple[Experiment, ...]:
        return self.resolved

    def span(self) -> timedelta:
        if self.duration is not None:
            return timedelta(seconds=self.duration)
        starts = [e.periods.baseline.start for e in self.resolved]
        ends = [e.periods.intervention.end for e in self.resolved]
        return max(ends) - min(starts)

    def anchored(self, anchor: datetime) -> list[Experiment]:
        """The experiments with their periods mapped onto ``[anchor - span, anchor)``."""
        span = self.span()
        w0 = anchor - span
        starts = [e.periods.baseline.start for e in self.resolved]
        ends = [e.periods.intervention.end for e in self.resolved]
        m0, m1 = min(starts), max(ends)
        scale = span / (m1 - m0)

        def at(t: datetime) -> datetime:
            return w0 + (t - m0) * scale

        out = []
        for e in self.resolved:
            p = e.periods
            periods = Periods(
                baseline=Period(start=at(p.baseline.start), end=at(p.baseline.end)),
                intervention=Period(start=at(p.intervention.start), end=at(p.intervention.end)),
            )
            out.append(e.model_copy(update={"periods": periods}))
        return out


class ScenarioError(ValueError):
    """A scenario file that cannot be used; the message names the file and the field."""


def _format(path: Path | str, what: str, err: ValidationError, prefix: str = "") -> str:
    lines = [f"{path}: invalid {what}"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {prefix}{loc}: {e['msg']}")
    return "\n".join(lines)


def _generated_devices(exp: Experiment, counts: GroupCounts, interval: int | None) -> tuple[Device, ...]:
    """``counts`` devices per group, cycling over the kinds (and intervals) the manifest has
    for that group (or over all its kinds when it has none in that group)."""
    out: list[Device] = []
    prefix = exp.id[:40]
    for group, n in (("treatment", counts.treatment), ("control", counts.control)):
        templates = [d for d in exp.devices if d.group == group] or list(exp.devices)
        kinds: dict[str, int] = {}
        for d in templates:
            kinds.setdefault(d.kind, d.interval)
        kind_list = list(kinds.items())
        for i in range(n):
            kind, every = kind_list[i % len(kind_list)]
            out.append(
                Device(id=f"{prefix}-{group[0]}{i:05d}", kind=kind, group=group, interval=interval or every)
            )
    return tuple(out)


def _resolve(spec: ExperimentSpec, index: int, base: Path, path: Path | str) -> Experiment:
    where = f"experiments.{index}"
    if spec.manifest is not None:
        file = spec.manifest if spec.manifest.is_absolute() else base / spec.manifest
        try:
            exp = load_manifest(file)
        except ManifestError as exc:
            raise ScenarioError(f"{path}: {where}.manifest: {exc}") from exc
    else:
        try:
            exp = Experiment.model_validate(spec.experiment)
        except ValidationError as exc:
            raise ScenarioError(_format(path, "scenario", exc, f"{where}.experiment.")) from exc
    update: dict = {}
    if spec.devices is not None:
        if spec.devices.treatment + spec.devices.control == 0:
            raise ScenarioError(f"{path}\n  {where}.devices: at least one device is needed")
        update["devices"] = _generated_devices(exp, spec.devices, spec.interval)
    elif spec.interval is not None:
        update["devices"] = tuple(d.model_copy(update={"interval": spec.interval}) for d in exp.devices)
    if spec.true_effects is not None:
        sim = exp.simulation or Simulation()
        update["simulation"] = sim.model_copy(update={"true_effects": dict(spec.true_effects)})
    if exp.simulation is not None and exp.simulation.outages:
        # a scenario's outages are its faults (faults.dropout.outages), timed on its own span:
        # the manifest's, timed on the manifest's periods and naming its devices, are dropped
        sim = update.get("simulation", exp.simulation)
        update["simulation"] = sim.model_copy(update={"outages": ()})
    if update:
        try:  # re-validate the whole experiment (unique ids, metric names...)
            exp = Experiment.model_validate({**exp.model_dump(), **{k: v for k, v in update.items()}})
        except ValidationError as exc:
            raise ScenarioError(_format(path, "scenario", exc, f"{where}.")) from exc
    return exp


def parse_scenario(data: object, path: Path | str = "<scenario>", base: Path | None = None) -> Scenario:
    """Validate a scenario document (already parsed YAML) and resolve its experiments."""
    if not isinstance(data, dict):
        raise ScenarioError(f"{path}: a scenario is a YAML mapping")
    try:
        scenario = Scenario.model_validate(data)
    except ValidationError as exc:
        raise ScenarioError(_format(path, "scenario", exc)) from exc
    base = base if base is not None else Path(".")
    resolved = tuple(_resolve(s, i, base, path) for i, s in enumerate(scenario.experiments))
    ids = [e.id for e in resolved]
    if dupes := sorted({i for i in ids if ids.count(i) > 1}):
        raise ScenarioError(f"{path}\n  experiments: experiment ids used twice: {', '.join(dupes)}")
    devices = [d.id for e in resolved for d in e.devices]
    if dupes := sorted({i for i in devices if devices.count(i) > 1})[:5]:
        raise ScenarioError(f"{path}\n  experiments: device ids in two experiments: {', '.join(dupes)}")
    return scenario.model_copy(update={"resolved": resolved})


def load_scenario(path: Path) -> Scenario:
    return parse_scenario(read_yaml(path, ScenarioError), path, path.parent)
