"""Experiment manifests: the YAML a city lab writes for each pilot.

A manifest names the devices (with their group, treatment or control), the baseline and
intervention periods, and the KPIs that decide whether the pilot worked. Errors name the
file and the field.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Literal

import orjson
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pilotlab import kpi_kinds
from pilotlab.kpi_kinds import KpiKind
from pilotlab.metrics import METRICS

_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d)\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_ID = r"^[a-z0-9][a-z0-9_-]{0,62}$"
_MAX_DURATION_S = 365 * 86400


def parse_duration(value: object) -> int:
    """``"15m"`` → 900. Whole seconds only; an int is taken as seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string such as '15m'")
    if isinstance(value, int):
        seconds = value
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = int(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    else:
        raise ValueError(f"{value!r} is not a duration such as '30s', '15m', '1h' or '1d'")
    if seconds <= 0:
        raise ValueError("a duration must be positive")
    if seconds > _MAX_DURATION_S:
        raise ValueError(f"a duration may be at most 365 days ({_MAX_DURATION_S} s)")
    return seconds


def _aware_utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("give the time zone, e.g. 2026-03-01T00:00:00Z")
    return value.astimezone(UTC)


Seconds = Annotated[int, BeforeValidator(parse_duration)]
UtcTime = Annotated[datetime, AfterValidator(_aware_utc)]
Identifier = Annotated[str, Field(pattern=_ID)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Location(_Model):
    lat: float = Field(ge=-90, le=90)
    lon: float = Field(ge=-180, le=180)


class Period(_Model):
    start: UtcTime
    end: UtcTime

    @model_validator(mode="after")
    def _ordered(self) -> Period:
        if self.end <= self.start:
            raise ValueError("end must be after start")
        return self

    def contains(self, ts: datetime) -> bool:
        return self.start <= ts < self.end


class Periods(_Model):
    baseline: Period
    intervention: Period

    @model_validator(mode="after")
    def _not_overlapping(self) -> Periods:
        if self.intervention.start < self.baseline.end:
            raise ValueError("the intervention must start after the baseline ends")
        return self


DeviceKind = Literal[
    "air_quality", "traffic_counter", "parking", "noise", "street_light", "e_mobility", "waste_bin"
]


class Device(_Model):
    id: Identifier
    kind: DeviceKind
    group: Literal["treatment", "control"] = "treatment"
    location: Location | None = None
    interval: Seconds = Field(description="expected sampling interval")


class Kpi(_Model):
    name: Identifier
    metric: str
    kind: KpiKind  # pilotlab.kpi_kinds.KINDS (docs/experiments.md, "One registry of kinds")
    window: Seconds = 60
    # the desired direction of change, for reading the impact: lower energy is better
    better: Literal["lower", "higher"] = "lower"
    # quantile only: which quantile, e.g. 0.5 (median) or 0.95
    q: float | None = Field(default=None, gt=0, lt=1)
    # exceedance only: the level a sample must exceed, in the metric's unit (PM2.5: 25)
    threshold: float | None = None
    # impact only, for planning (`pilotlab plan`): the effect the pilot hopes for (relative,
    # -0.2 = -20%, for ratio-scale metrics; in the metric's unit for interval-scale ones) and
    # the spread across devices of a device's change between two periods without intervention
    # (log ratio, ~ relative, for ratio-scale metrics; in the unit otherwise)
    expected_effect: float | None = None
    change_sd: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _known_metric(self) -> Kpi:
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; known: {', '.join(sorted(METRICS))}")
        return self

    @model_validator(mode="after")
    def _parameters(self) -> Kpi:
        problems = kpi_kinds.parameter_problems(self.kind, self._params())
        if problems:
            raise ValueError(problems[0])
        if (
            self.expected_effect is not None
            and METRICS[self.metric].scale == "ratio"
            and self.expected_effect <= -1
        ):
            raise ValueError("expected_effect is relative for this metric: -0.2 is -20%; it must be above -1")
        return self

    def signature(self) -> str:
        """What the KPI computes; a window state made under another signature starts afresh."""
        return kpi_kinds.signature(self.kind, self._params())

    def _params(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in kpi_kinds.PARAMS}


class SimulatedOutage(_Model):
    """A device of a simulated pilot silent for a while (power cut, vandalism, lost network):
    it sends nothing from ``start`` after the baseline start for ``duration``."""

    device: Identifier
    start: Seconds = Field(description="from the baseline start, e.g. 18d or 435h")
    duration: Seconds = Field(description="how long nothing arrives, e.g. 5h")


class Simulation(_Model):
    """For simulated pilots only: the truth the pipeline should recover, and how realistic
    (hard to analyse) the simulated readings are (see :mod:`simulators.models`).

    The defaults give what real street sensors have: each device drifts slowly on its own
    (``device_noise_sd`` 8% with a 2 h correlation time, so neighbouring readings are far
    from independent), and every device of the pilot shares the weather (``weather_sd``);
    ``trend`` adds a city-wide drift over the pilot, the same for treatment and control.
    """

    true_effects: dict[str, float] = Field(
        default_factory=dict,
        description=(
            "metric → change on treatment devices from the intervention start: relative for "
            "ratio-scale metrics (-0.3 = -30%), absolute in the metric's unit for interval-scale "
            "ones (noise: dB(A), lat/lon: degrees)"
        ),
    )
    bad_message_rate: float = Field(default=0.0, ge=0, le=1)
    outages: tuple[SimulatedOutage, ...] = Field(
        default=(), description="devices that send nothing for a while (what the device_offline alert catches)"
    )
    device_noise_sd: float = Field(
        default=0.08,
        ge=0,
        le=1,
        description=(
            "marginal SD of each device's own slow multiplicative factor exp(z), z an AR(1) "
            "process (relative: 0.08 ≈ ±8%; for the sound level, of its sound energy); 0 turns it off"
        ),
    )
    device_noise_correlation: Seconds = Field(
        default=2 * 3600,
        description=(
            "correlation time tau of the device factor: readings dt apart have correlation "
            "exp(-dt/tau), whatever the device's interval"
        ),
    )
    trend: float = Field(
        default=0.0,
        gt=-1,
        le=10,
        description=(
            "shared linear trend: the relative change from the baseline start to the intervention "
            "end, the same for treatment and control devices (0.1 = +10%; for the sound level, of its "
            "sound energy)"
        ),
    )
    weather_sd: float = Field(
        default=0.3,
        ge=0,
        le=1,
        description="SD (log scale) of the slow weather factor shared by the devices of the experiment",
    )

    @field_validator("true_effects")
    @classmethod
    def _relative_above_minus_one(cls, effects: dict[str, float]) -> dict[str, float]:
        for metric, effect in effects.items():
            m = METRICS.get(metric)
            if m is not None and m.scale == "ratio" and effect <= -1:
                raise ValueError(f"the effect on {metric} is relative: -0.3 is -30%; it must be above -1")
        return effects


# --- alerts (streams/alerts.py evaluates them; docs/alerts.md) ---------------------------------


def _seconds_or_zero(value: object) -> int:
    """Like ``parse_duration`` but 0 (``"0s"``) is allowed: a grace of none."""
    if value in (0, "0", "0s", "0m", "0h"):
        return 0
    return parse_duration(value)


GraceSeconds = Annotated[int, BeforeValidator(_seconds_or_zero)]

AlertKind = Literal[
    "device_offline",  # a device silent for longer than ``after`` (event time)
    "completeness_below",  # a device's received / expected samples over ``window`` below ``threshold``
    "kpi_above",  # a KPI window's value above ``threshold``
    "kpi_below",  # a KPI window's value below ``threshold``
    "rejection_rate_above",  # a device's refused / (refused + accepted) items over ``window`` above ``threshold``
]
DEVICE_ALERT_KINDS = ("device_offline", "completeness_below", "rejection_rate_above")


class AlertRule(_Model):
    """One alert rule. Device-level kinds judge each device of the experiment (``devices``
    narrows them); KPI kinds judge each group's windows of one KPI."""

    name: Identifier
    kind: AlertKind
    severity: Literal["info", "warning", "critical"] = "warning"
    enabled: bool = True
    # how far behind the newest event a moment must be before it is judged: events that arrive
    # out of order by less than this give exactly the same alerts (streams/alerts.py)
    grace: GraceSeconds = 60
    # device_offline: silence that fires; default the experiment's liveness threshold
    # (offline_after × the device's interval, as on pilotlab.device-status)
    after: Seconds | None = None
    # completeness_below, rejection_rate_above: the tumbling window judged
    window: Seconds | None = None
    # completeness (0-1], a rate (0-1), or a KPI value in the KPI's unit
    threshold: float | None = None
    # kpi_above / kpi_below: which KPI and group ("all" for an impact-free cross-group KPI is not
    # a thing: treatment or control; None judges both groups, each on its own)
    kpi: str | None = None
    group: Literal["treatment", "control"] | None = None
    # rejection_rate_above: judge a window only with at least this many items, and count only
    # these reason codes (None: all)
    min_count: int = Field(default=10, ge=1)
    reasons: tuple[str, ...] | None = None
    # device-level kinds: only these devices (None: every device of the experiment)
    devices: tuple[str, ...] | None = None

    @model_validator(mode="after")
    def _parameters(self) -> AlertRule:
        k = self.kind
        if k == "device_offline":
            for name in ("window", "threshold", "kpi", "group"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} does not apply to device_offline (use after)")
        if k != "device_offline" and self.after is not None:
            raise ValueError(f"after applies to device_offline only, not {k}")
        if k in ("completeness_below", "rejection_rate_above"):
            if self.threshold is None:
                raise ValueError(f"{k} needs threshold, e.g. threshold: {0.8 if k == 'completeness_below' else 0.2}")
            if not 0 < self.threshold <= 1:
                raise ValueError(f"the threshold of {k} is a share: above 0, at most 1")
            if self.kpi is not None or self.group is not None:
                raise ValueError(f"kpi and group apply to KPI rules only, not {k}")
        if k in ("kpi_above", "kpi_below"):
            if self.kpi is None or self.threshold is None:
                raise ValueError(f"{k} needs kpi and threshold, e.g. kpi: no2_mean, threshold: 40")
            if self.window is not None:
                raise ValueError("a KPI rule judges the KPI's own windows: drop window")
            if self.devices is not None:
                raise ValueError("devices applies to device-level rules only")
        if k != "rejection_rate_above" and self.reasons is not None:
            raise ValueError(f"reasons applies to rejection_rate_above only, not {k}")
        return self

    @property
    def window_s(self) -> int:
        """The judged window of completeness and rejection-rate rules (default 1 h / 15 min)."""
        if self.window is not None:
            return self.window
        return 3600 if self.kind == "completeness_below" else 900


class Webhook(_Model):
    """An HTTP endpoint that receives every alert transition as a signed JSON POST."""

    name: Identifier
    url: Annotated[str, Field(pattern=r"^https?://[^\s]+$")]
    # the HMAC-SHA256 key of X-Pilotlab-Signature: better the name of an environment variable
    # of the alerts service (a secret written here travels in the registry topic and is stored
    # in experiments.manifest, which the read-only role can read)
    secret_env: Annotated[str, Field(pattern=r"^[A-Z_][A-Z0-9_]*$")] | None = None
    secret: str | None = Field(default=None, min_length=16)

    @model_validator(mode="after")
    def _one_secret(self) -> Webhook:
        if (self.secret is None) == (self.secret_env is None):
            raise ValueError("give the signing key as secret_env (an environment variable's name) or secret")
        return self


_EMAIL = r"^[^@\s]+@[^@\s]+$"


class Notify(_Model):
    """Where an experiment's alerts go (besides the lab-wide defaults')."""

    webhooks: tuple[Webhook, ...] = ()
    email: tuple[Annotated[str, Field(pattern=_EMAIL)], ...] = ()
    # device-level alerts also go to the device's MQTT feedback topic as {"alerts": [...]}
    mqtt_feedback: bool = True

    @field_validator("webhooks")
    @classmethod
    def _unique_names(cls, hooks: tuple[Webhook, ...]) -> tuple[Webhook, ...]:
        names = [h.name for h in hooks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate webhook names: {', '.join(dupes)}")
        return hooks


def _unique_rule_names(rules: tuple[AlertRule, ...]) -> tuple[AlertRule, ...]:
    names = [r.name for r in rules]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"duplicate alert rule names: {', '.join(dupes)}")
    return rules


# devices tuple id → (the tuple, id → device): Experiment.device in O(1) (a frozen model's cache)
_DEVICE_INDEX: dict[int, tuple[tuple, dict]] = {}


class Experiment(_Model):
    id: Identifier
    title: str
    startup: str
    district: str
    location: Location
    periods: Periods
    devices: tuple[Device, ...] = Field(min_length=1)
    kpis: tuple[Kpi, ...] = Field(min_length=1)
    # event time: a reading whose (shortest) KPI window ended more than this before the newest
    # reading of the experiment is routed to pilotlab.late instead of revising the KPI
    lateness: Seconds = Field(default=6 * 3600, description="allowed lateness")
    # liveness: a device silent for this many of its expected intervals is reported offline
    offline_after: int = Field(default=6, ge=1, le=10_000)
    simulation: Simulation | None = None
    # alert rules (with the lab-wide defaults: docs/alerts.md) and where the alerts go
    alerts: tuple[AlertRule, ...] = ()
    notify: Notify = Notify()

    @field_validator("devices", "kpis")
    @classmethod
    def _unique_ids(cls, items: tuple, info: ValidationInfo) -> tuple:
        what = "device" if info.field_name == "devices" else "kpi"
        ids = [i.id if what == "device" else i.name for i in items]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"duplicate {what} ids: {', '.join(dupes)}")
        return items

    @field_validator("alerts")
    @classmethod
    def _unique_alert_names(cls, rules: tuple[AlertRule, ...]) -> tuple[AlertRule, ...]:
        return _unique_rule_names(rules)

    @model_validator(mode="after")
    def _alerts_refer_to_this_experiment(self) -> Experiment:
        problems = alert_rule_problems(self, self.alerts)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _outages_of_its_devices(self) -> Experiment:
        unknown = sorted(
            {o.device for o in (self.simulation.outages if self.simulation else ()) if self.device(o.device) is None}
        )
        if unknown:
            raise ValueError(f"simulation.outages: not devices of this experiment: {', '.join(unknown)}")
        return self

    def device(self, device_id: str) -> Device | None:
        index = _DEVICE_INDEX.get(id(self.devices))
        if index is None or index[0] is not self.devices:
            if len(_DEVICE_INDEX) > 256:
                _DEVICE_INDEX.clear()
            index = _DEVICE_INDEX[id(self.devices)] = (self.devices, {d.id: d for d in self.devices})
        return index[1].get(device_id)

    def shifted(self, delta: timedelta) -> Experiment:
        """The same experiment with both periods moved by ``delta`` (the demo anchors them to now)."""
        periods = Periods(
            baseline=Period(start=self.periods.baseline.start + delta, end=self.periods.baseline.end + delta),
            intervention=Period(
                start=self.periods.intervention.start + delta, end=self.periods.intervention.end + delta
            ),
        )
        return self.model_copy(update={"periods": periods})

    def to_json(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))

    @classmethod
    def from_json(cls, raw: bytes) -> Experiment:
        return cls.model_validate(orjson.loads(raw))


def alert_rule_problems(experiment: Experiment, rules: tuple[AlertRule, ...]) -> list[str]:
    """What in these rules does not fit this experiment: unknown devices, a KPI it does not
    have or one without windows (impact)."""
    problems = []
    kpis = {k.name: k for k in experiment.kpis}
    for r in rules:
        for d in r.devices or ():
            if experiment.device(d) is None:
                problems.append(f"alert {r.name}: device {d!r} is not a device of this experiment")
        if r.kind == "completeness_below":
            scope = [experiment.device(d) for d in r.devices] if r.devices else experiment.devices
            slow = sorted(d.id for d in scope if d is not None and d.interval > r.window_s)
            if slow:
                problems.append(
                    f"alert {r.name}: its window ({r.window_s} s) is shorter than the interval of {', '.join(slow)}"
                )
        if r.kpi is not None:
            kpi = kpis.get(r.kpi)
            if kpi is None:
                problems.append(f"alert {r.name}: no KPI named {r.kpi!r}; known: {', '.join(sorted(kpis))}")
            elif kpi.kind == "impact":
                problems.append(f"alert {r.name}: {r.kpi!r} is an impact KPI, which has no windows to judge")
    return problems


class ManifestError(ValueError):
    """A manifest file that cannot be used; the message names the file and the field."""


def _format_errors(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: invalid experiment manifest"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {loc}: {e['msg']}")
    return "\n".join(lines)


def read_yaml(path: Path, error: type[ValueError]) -> object:
    """A YAML file's content; unreadable, non-UTF-8 or invalid YAML raises ``error`` naming the file."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {exc}") from exc
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start}); save the file as UTF-8") from exc


def load_manifest(path: Path) -> Experiment:
    data = read_yaml(path, ManifestError)
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: an experiment manifest is a YAML mapping")
    try:
        return Experiment.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(_format_errors(path, exc)) from exc


def load_manifests(path: Path) -> list[Experiment]:
    """One file, or every ``*.yaml``/``*.yml`` in a directory (sorted)."""
    if path.is_dir():
        files = sorted([*path.glob("*.yaml"), *path.glob("*.yml")])
        if not files:
            raise ManifestError(f"{path}: no *.yaml manifests in this directory")
    else:
        files = [path]
    experiments = [load_manifest(f) for f in files]
    ids = [e.id for e in experiments]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ManifestError(f"{path}: experiment ids used twice: {', '.join(dupes)}")
    return experiments
