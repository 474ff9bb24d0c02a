"""Alert rules and targets in manifests and in the lab's defaults file: validation with the
file and field named, how defaults combine with an experiment's own rules, the settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from pilotlab import settings as cfg
from pilotlab.alert_config import AlertDefaultsError, load_alert_defaults, rules_for, targets_for
from pilotlab.manifest import AlertRule, ManifestError, load_manifest, load_manifests

ROOT = Path(__file__).resolve().parents[2]
LEZ = ROOT / "control" / "examples" / "experiments" / "lez-san-salvario.yaml"
DEFAULTS = ROOT / "control" / "examples" / "alerts-defaults.yaml"


def manifest(tmp_path: Path, **changes) -> Path:
    doc = yaml.safe_load(LEZ.read_text(encoding="utf-8"))
    doc.update(changes)
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def test_the_examples_have_alerts_and_the_lab_defaults_load() -> None:
    experiments = load_manifests(ROOT / "control" / "examples" / "experiments")
    assert all(e.alerts for e in experiments)
    defaults = load_alert_defaults(DEFAULTS)
    assert defaults.alerts and defaults.notify.email
    for e in experiments:
        names = [r.name for r in rules_for(e, defaults)]
        assert names == sorted(set(names))


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"kind": "device_offline", "threshold": 1}, "threshold does not apply to device_offline"),
        ({"kind": "completeness_below"}, "completeness_below needs threshold"),
        ({"kind": "completeness_below", "threshold": 1.5}, "is a share"),
        ({"kind": "kpi_above", "threshold": 3}, "kpi_above needs kpi and threshold"),
        ({"kind": "kpi_above", "kpi": "no2_mean", "threshold": 3, "window": "1h"}, "drop window"),
        ({"kind": "rejection_rate_above", "threshold": 0.2, "after": "1h"}, "after applies to device_offline"),
        ({"kind": "device_offline", "reasons": ["duplicate"]}, "reasons applies to rejection_rate_above"),
        ({"kind": "device_offline", "after": "soon"}, "is not a duration"),
        ({"kind": "device_offline", "grace": -1}, "must be positive"),
        ({"kind": "nope"}, "Input should be"),
    ],
)
def test_rule_errors_name_what_is_wrong(rule, message) -> None:
    with pytest.raises(ValidationError, match=message):
        AlertRule.model_validate({"name": "r", **rule})


def test_a_grace_of_zero_is_allowed() -> None:
    assert AlertRule.model_validate({"name": "r", "kind": "device_offline", "grace": "0s"}).grace == 0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"alerts": [{"name": "a", "kind": "device_offline"}, {"name": "a", "kind": "device_offline"}]},
            "duplicate alert rule names: a",
        ),
        (
            {"alerts": [{"name": "a", "kind": "device_offline", "devices": ["ghost"]}]},
            "device 'ghost' is not a device of this experiment",
        ),
        (
            {"alerts": [{"name": "a", "kind": "kpi_below", "kpi": "no2_impact", "threshold": 1}]},
            "'no2_impact' is an impact KPI",
        ),
        ({"notify": {"webhooks": [{"name": "w", "url": "http://x.test/"}]}}, "secret_env"),
        ({"notify": {"webhooks": [{"name": "w", "url": "ftp://x.test/", "secret_env": "S"}]}}, "notify.webhooks.0.url"),
        ({"notify": {"email": ["not-an-address"]}}, "notify.email.0"),
    ],
)
def test_manifest_errors_name_the_file_and_field(tmp_path: Path, changes, message) -> None:
    with pytest.raises(ManifestError) as err:
        load_manifest(manifest(tmp_path, **changes))
    assert str(err.value).startswith(f"{tmp_path / 'm.yaml'}: invalid experiment manifest")
    assert message in str(err.value)


def test_defaults_apply_unless_overridden_disabled_or_unfit(tmp_path: Path) -> None:
    defaults_file = tmp_path / "d.yaml"
    defaults_file.write_text(
        yaml.safe_dump(
            {
                "alerts": [
                    {"name": "offline", "kind": "device_offline"},
                    {"name": "noisy", "kind": "rejection_rate_above", "threshold": 0.5},
                    {"name": "hot", "kind": "kpi_above", "kpi": "no2_mean", "threshold": 80},
                    {"name": "energy", "kind": "kpi_above", "kpi": "energy_mean", "threshold": 1},
                    {"name": "thin", "kind": "completeness_below", "threshold": 0.5, "window": "5m"},
                ],
                "notify": {
                    "webhooks": [{"name": "ops", "url": "https://ops.test/h", "secret_env": "OPS"}],
                    "email": ["lab@city.test"],
                },
            }
        )
    )
    defaults = load_alert_defaults(defaults_file)
    exp = load_manifest(
        manifest(
            tmp_path,
            alerts=[
                {"name": "offline", "kind": "device_offline", "after": "2h"},
                {"name": "noisy", "kind": "rejection_rate_above", "threshold": 0.5, "enabled": False},
            ],
            notify={"email": ["startup@air.test", "lab@city.test"], "mqtt_feedback": False},
        )
    )
    rules = {r.name: r for r in rules_for(exp, defaults)}
    # its own offline rule wins, noisy is off, energy_mean is not a KPI of it, 5 min < 15 min interval
    assert sorted(rules) == ["hot", "offline"]
    assert rules["offline"].after == 7200
    targets = targets_for(exp, defaults)
    assert targets.email == ("startup@air.test", "lab@city.test")
    assert [(scope, h.name) for scope, h in targets.webhooks] == [("lab", "ops")]
    assert targets.webhook("lab:ops").url == "https://ops.test/h" and targets.webhook("experiment:ops") is None
    assert targets.mqtt_feedback is False


def test_defaults_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "d.yaml"
    bad.write_text("alerts:\n  - {name: x, kind: device_offline, devices: [a]}\n")
    with pytest.raises(AlertDefaultsError, match=r"d.yaml: invalid alert defaults\n  alerts: .*cannot name devices"):
        load_alert_defaults(bad)
    bad.write_text("- 1\n")
    with pytest.raises(AlertDefaultsError, match="a YAML mapping"):
        load_alert_defaults(bad)
    assert load_alert_defaults(None).alerts == ()


def test_settings_validate_the_defaults_file_and_urls_at_start_up(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PILOTLAB_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    monkeypatch.setenv("PILOTLAB_DATABASE_URL", "postgresql://w:p@127.0.0.1/pilotlab")
    s = cfg.load(cfg.AlertsSettings)
    assert s.smtp_url is None and s.alerts_defaults is None and s.alerts_max_attempts == 10
    bad = tmp_path / "d.yaml"
    bad.write_text("alerts: [{name: x, kind: bogus}]\n")
    monkeypatch.setenv("PILOTLAB_ALERTS_DEFAULTS", str(bad))
    monkeypatch.setenv("PILOTLAB_SMTP_URL", "http://mail")
    with pytest.raises(cfg.SettingsError) as err:
        cfg.load(cfg.AlertsSettings)
    text = str(err.value)
    assert "PILOTLAB_ALERTS_DEFAULTS" in text and "invalid alert defaults" in text
    assert "PILOTLAB_SMTP_URL" in text and "smtp://" in text
    monkeypatch.setenv("PILOTLAB_ALERTS_DEFAULTS", str(DEFAULTS))
    monkeypatch.setenv("PILOTLAB_SMTP_URL", "smtp://u:p@mail.test:587?starttls=1")
    s = cfg.load(cfg.AlertsSettings)
    assert "u:p" not in repr(s)  # the SMTP password stays out of logs
