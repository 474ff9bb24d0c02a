"""Lab-wide alert defaults and how they combine with an experiment's own rules and targets.

The lab's YAML file (``PILOTLAB_ALERTS_DEFAULTS``; ``control/examples/alerts-defaults.yaml``) has the
same two sections as a manifest, ``alerts:`` and ``notify:``:

- every default rule applies to every experiment, unless the experiment has a rule of the same
  name (its own wins, ``enabled: false`` switches it off); a default rule that does not fit an
  experiment (a KPI it does not have, a completeness window shorter than one of its devices'
  intervals) is not applied to that experiment;
- the lab's targets receive every experiment's alerts, besides the experiment's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError, field_validator

from pilotlab.manifest import (
    AlertRule,
    Experiment,
    Notify,
    Webhook,
    _format_errors,
    _Model,
    _unique_rule_names,
    alert_rule_problems,
    read_yaml,
)


class AlertDefaultsError(ValueError):
    """A defaults file that cannot be used; the message names the file and the field."""


class AlertDefaults(_Model):
    alerts: tuple[AlertRule, ...] = ()
    notify: Notify = Notify()

    @field_validator("alerts")
    @classmethod
    def _unique(cls, rules: tuple[AlertRule, ...]) -> tuple[AlertRule, ...]:
        return _unique_rule_names(rules)

    @field_validator("alerts")
    @classmethod
    def _no_devices(cls, rules: tuple[AlertRule, ...]) -> tuple[AlertRule, ...]:
        for r in rules:
            if r.devices is not None:
                raise ValueError(f"alert {r.name}: a lab-wide rule cannot name devices")
        return rules


def load_alert_defaults(path: Path | str | None) -> AlertDefaults:
    """The lab's defaults (none without a path); errors name the file and the field."""
    if path is None or str(path) == "":
        return AlertDefaults()
    path = Path(path)
    data = read_yaml(path, AlertDefaultsError)
    if data is None:
        return AlertDefaults()
    if not isinstance(data, dict):
        raise AlertDefaultsError(f"{path}: alert defaults are a YAML mapping with alerts: and notify:")
    try:
        return AlertDefaults.model_validate(data)
    except ValidationError as exc:
        raise AlertDefaultsError(
            _format_errors(path, exc).replace("invalid experiment manifest", "invalid alert defaults")
        ) from exc


def rules_for(experiment: Experiment, defaults: AlertDefaults) -> tuple[AlertRule, ...]:
    """The rules in force for an experiment: its own, then the defaults it does not override
    (and that fit it), without the disabled ones; sorted by name."""
    own = {r.name: r for r in experiment.alerts}
    rules = dict(own)
    for r in defaults.alerts:
        if r.name in own or alert_rule_problems(experiment, (r,)):
            continue
        rules[r.name] = r
    return tuple(r for _, r in sorted(rules.items()) if r.enabled)


@dataclass(frozen=True, slots=True)
class Targets:
    """Where one experiment's alerts go: (scope, webhook) pairs, e-mail addresses, and whether
    device-level alerts go to the device's feedback topic. ``scope`` is ``experiment`` or
    ``lab``: a delivery names its webhook as ``scope:name``."""

    webhooks: tuple[tuple[str, Webhook], ...]
    email: tuple[str, ...]
    mqtt_feedback: bool

    def webhook(self, ref: str) -> Webhook | None:
        scope, _, name = ref.partition(":")
        return next((h for s, h in self.webhooks if s == scope and h.name == name), None)


def targets_for(experiment: Experiment, defaults: AlertDefaults) -> Targets:
    hooks = tuple(("experiment", h) for h in experiment.notify.webhooks) + tuple(
        ("lab", h) for h in defaults.notify.webhooks
    )
    email = tuple(dict.fromkeys((*experiment.notify.email, *defaults.notify.email)))
    return Targets(hooks, email, experiment.notify.mqtt_feedback)
