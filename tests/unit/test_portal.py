"""The portal's pure parts: how impacts, credentials, times and excerpts read, its settings and
what ``pilotlab serve`` fills beside an embedded stack (the app on a real database:
tests/integration/test_portal.py)."""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from dashboards.portal import cli, views
from dashboards.portal.app import credentials_secret
from dashboards.portal.settings import PortalSettings
from pilotlab.credentials import SECRET_FILE, derive_password, load_or_create_secret
from storage.portal_queries import ImpactKpi

NOW = datetime(2026, 12, 2, 13, 0, tzinfo=UTC)
SECRET = "s" * 40


def row(details: dict | None) -> ImpactKpi:
    return ImpactKpi("no2_impact", "no2", None, 0, 3, details, NOW)


@pytest.mark.parametrize(
    ("details", "verdict", "text", "devices"),
    [
        (
            {"estimate": -0.291, "ci_low": -0.33, "ci_high": -0.25, "verdict": "improved",
             "devices": {"treatment": 6, "control": 6}, "design": "difference-in-differences"},
            "improved", "-29.1% [95% CI -33.0% … -25.0%]", "6 vs 6 devices",
        ),
        (
            {"estimate": 1.02, "ci_low": 0.4, "ci_high": 1.64, "scale": "absolute", "unit": "degC",
             "verdict": "worsened", "devices": {"treatment": 3, "control": 3}},
            "worsened", "+1.02 degC [95% CI +0.40 … +1.64 degC]", "3 vs 3 devices",
        ),
        (
            {"estimate": 0.05, "verdict": "inconclusive", "warnings": ["no_control_group"],
             "devices": {"treatment": 4}, "design": "before-after"},
            "inconclusive", "+5.0%", "4 devices, no control group",
        ),
        (None, "inconclusive", "no estimate yet", "0 devices, no control group"),
    ],
)
def test_impact_view_reads_like_the_report(details, verdict, text, devices):
    v = views.impact_view(row(details))
    assert (v.verdict, v.text, v.devices) == (verdict, text, devices)
    assert v.symbol and v.colour.startswith("#")
    assert v.details == (details or {})


def test_impact_view_warnings_are_sentences():
    v = views.impact_view(row({"verdict": "inconclusive", "warnings": ["no_control_group", "made-up-code"]}))
    assert len(v.warnings) == 2
    assert v.warnings[0] != "no_control_group"  # its sentence (pilotlab.contracts.IMPACT_WARNINGS)
    assert v.warnings[1] == "made-up-code"  # unknown: as it is


def test_device_credentials_derive_passwords_and_drop_the_lab_account():
    secret = b"k" * 32
    creds = views.device_credentials("exp-1", ["d2", "d1"], secret, "mqtt://pilotlab:labpass@127.0.0.1:18830")
    assert [c.device_id for c in creds] == ["d1", "d2"]
    c = creds[0]
    assert (c.host, c.port, c.tls, c.username) == ("127.0.0.1", 18830, False, "d1")
    assert c.password == derive_password(secret, "d1")
    assert c.publish_to == "pilots/exp-1/d1/telemetry"
    assert c.feedback_from == "pilots/exp-1/d1/feedback"
    assert "labpass" not in repr(creds)
    assert views.device_credentials("e", ["d"], secret, "mqtts://broker.example:8883")[0].tls


@pytest.mark.parametrize(
    ("value", "digits", "text"), [(0.97312, 1, "97.3%"), (0.0, 2, "0.00%"), (1.0, 1, "100.0%"),
                                  (None, 1, "—"), (float("nan"), 1, "—")],
)
def test_pct(value, digits, text):
    assert views.pct(value, digits) == text


@pytest.mark.parametrize(
    ("delta", "text"),
    [(timedelta(seconds=12), "12 s ago"), (timedelta(minutes=3, seconds=5), "3 min ago"),
     (timedelta(hours=5), "5 h ago"), (timedelta(days=4, hours=1), "4 d ago"), (timedelta(minutes=-2), "in 2 min")],
)
def test_ago(delta, text):
    assert views.ago(NOW - delta, NOW) == text


def test_when():
    assert views.when(None, NOW) == "never"
    assert views.when(NOW - timedelta(minutes=1), NOW) == "2026-12-02 12:59:00 UTC (1 min ago)"


@pytest.mark.parametrize(
    ("text", "limit", "out"),
    [("short", 120, "short"), ("a\n  b\tc", 120, "a b c"), ("x" * 10, 5, "xxxx…"), (None, 5, ""), ("", 5, "")],
)
def test_excerpt(text, limit, out):
    assert views.excerpt(text, limit) == out


# --- settings ----------------------------------------------------------------------------------


def settings(**kw) -> PortalSettings:
    return PortalSettings(**{"portal_session_secret": SECRET, **kw})


def test_settings_need_a_database_but_never_the_sinks(monkeypatch):
    monkeypatch.setenv("PILOTLAB_DATABASE_URL", "postgresql://pilotlab_writer:w@h/db")
    with pytest.raises(ValidationError, match="PILOTLAB_PORTAL_DATABASE_URL"):
        settings()
    assert settings(database_reader_url="postgresql://r@h/db").database_url == "postgresql://r@h/db"
    assert settings(database_reader_url="postgresql://r@h/db",
                    portal_database_url="postgresql://p@h/db").database_url == "postgresql://p@h/db"


@pytest.mark.parametrize(
    "bad",
    [{"portal_session_secret": "short"}, {"portal_database_url": "mysql://x"}, {"portal_port": 0},
     {"mqtt_url": "http://broker"}, {"portal_refresh_s": 0}],
)
def test_settings_refuse(bad):
    with pytest.raises(ValidationError):
        settings(**{"portal_database_url": "postgresql://p@h/db", **bad})


def test_settings_have_no_session_secret_default(monkeypatch):
    monkeypatch.delenv("PILOTLAB_PORTAL_SESSION_SECRET", raising=False)
    with pytest.raises(ValidationError, match="portal_session_secret"):
        PortalSettings(portal_database_url="postgresql://p@h/db")


def test_settings_are_frozen():
    s = settings(portal_database_url="postgresql://p@h/db")
    with pytest.raises(ValidationError):
        s.portal_port = 1


def test_broker_for_devices_prefers_the_portals():
    s = settings(portal_database_url="postgresql://p@h/db", mqtt_url="mqtt://lab:pw@127.0.0.1:1883")
    assert s.device_broker_url == "mqtt://lab:pw@127.0.0.1:1883"
    assert settings(portal_database_url="postgresql://p@h/db", mqtt_url="mqtt://a:1",
                    portal_mqtt_url="mqtts://pilots.example:8883").device_broker_url == "mqtts://pilots.example:8883"


def test_credentials_secret_sources(tmp_path):
    base = {"portal_database_url": "postgresql://p@h/db"}
    assert credentials_secret(settings(**base)) is None
    assert credentials_secret(settings(**base, credentials_secret="lab-secret")) == b"lab-secret"
    assert credentials_secret(settings(**base, portal_credentials_dir=tmp_path)) is None  # no file
    stored = load_or_create_secret(tmp_path / SECRET_FILE)
    assert credentials_secret(settings(**base, portal_credentials_dir=tmp_path)) == stored


# --- what `pilotlab serve` fills beside an embedded stack ----------------------------------------


def test_serve_fills_nothing_without_a_stack(tmp_path):
    assert cli.stack_defaults(tmp_path, {}) == {}
    assert not (tmp_path / "portal").exists()


def test_serve_keeps_a_session_secret_and_finds_the_mqtt_secret(tmp_path):
    (tmp_path / "state.json").write_text("{}")
    first = cli.stack_defaults(tmp_path, {})
    secret = first[cli.SESSION_SECRET_VAR]
    assert len(secret) == 64
    path = tmp_path / "portal" / "session-secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert cli.stack_defaults(tmp_path, {})[cli.SESSION_SECRET_VAR] == secret  # the same across restarts
    assert "PILOTLAB_PORTAL_CREDENTIALS_DIR" not in first  # no MQTT secret yet

    load_or_create_secret(tmp_path / "mosquitto" / SECRET_FILE)
    filled = cli.stack_defaults(tmp_path, {})
    assert filled["PILOTLAB_PORTAL_CREDENTIALS_DIR"] == str((tmp_path / "mosquitto").resolve())


def test_serve_never_overrides_what_is_set(tmp_path):
    (tmp_path / "state.json").write_text("{}")
    load_or_create_secret(tmp_path / "mosquitto" / SECRET_FILE)
    env = {cli.SESSION_SECRET_VAR: "x" * 40, "PILOTLAB_CREDENTIALS_SECRET": "lab"}
    assert cli.stack_defaults(tmp_path, env) == {}


def test_demo_prints_the_portal_with_its_tokens():
    from control.demo import portal_text  # noqa: PLC0415 - the composition's side of the portal

    text = portal_text({"url": "http://127.0.0.1:8088/", "lab_token": "plt_lab", "startup": "LumenSense",
                        "startup_token": "plt_lumen", "log": "x"})
    assert text.splitlines() == [
        "portal: http://127.0.0.1:8088/ (log in with a token; API: http://127.0.0.1:8088/api)",
        "  lab token (every pilot): plt_lab",
        "  startup token (LumenSense: its pilot only): plt_lumen",
    ]
    assert "startup token" not in portal_text({"url": "u/", "lab_token": "t", "startup": None, "startup_token": None})
