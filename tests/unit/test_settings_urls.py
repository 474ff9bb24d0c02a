"""Every settings object (the services', the simulator's, the portal's) checks its MQTT and
PostgreSQL URLs with the same type (pilotlab.settings.MqttUrl, PostgresUrl): what one service
accepts, every other accepts, and a wrong scheme stops each with the variable's name."""

from __future__ import annotations

import os

import pytest

from dashboards.portal.settings import PortalSettings
from pilotlab import settings as s
from simulators.settings import SimulatorSettings

KAFKA = {"PILOTLAB_KAFKA_BOOTSTRAP": "127.0.0.1:9092"}
PG = "postgresql://u:p@127.0.0.1:5432/db"
PORTAL = {"PILOTLAB_PORTAL_SESSION_SECRET": "s" * 32}

# (settings class, the URL's variable, what else the class requires)
MQTT_FIELDS = [
    (s.IngestSettings, "PILOTLAB_MQTT_URL", KAFKA),
    (s.AlertsSettings, "PILOTLAB_MQTT_URL", {**KAFKA, "PILOTLAB_DATABASE_URL": PG}),
    (SimulatorSettings, "PILOTLAB_MQTT_URL", {}),
    (PortalSettings, "PILOTLAB_MQTT_URL", {**PORTAL, "PILOTLAB_DATABASE_READER_URL": PG}),
    (PortalSettings, "PILOTLAB_PORTAL_MQTT_URL", {**PORTAL, "PILOTLAB_DATABASE_READER_URL": PG}),
]
PG_FIELDS = [
    (s.SinkSettings, "PILOTLAB_DATABASE_URL", KAFKA),
    (s.AlertsSettings, "PILOTLAB_DATABASE_URL", KAFKA),
    (s.MigrateSettings, "PILOTLAB_DATABASE_OWNER_URL", {}),
    (s.ReportSettings, "PILOTLAB_DATABASE_URL", {}),
    (s.ReportSettings, "PILOTLAB_DATABASE_READER_URL", {"PILOTLAB_DATABASE_URL": PG}),
    (s.PlanSettings, "PILOTLAB_DATABASE_URL", {}),
    (PortalSettings, "PILOTLAB_PORTAL_DATABASE_URL", PORTAL),
    (PortalSettings, "PILOTLAB_DATABASE_READER_URL", PORTAL),
]
MQTT_GOOD = ["mqtt://127.0.0.1:1883", "mqtts://lab.example:8883", "mqtt://user:pw@host:1883"]
MQTT_BAD = ["http://127.0.0.1:1883", "127.0.0.1:1883", "tcp://host:1883", ""]
PG_GOOD = [PG, "postgres://u@host/db"]
PG_BAD = ["mysql://u@host/db", "host:5432", ""]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("PILOTLAB_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(s, "_endpoint_defaults", [])  # no running stack fills anything in


def _load(monkeypatch, cls, env: dict[str, str]):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return s.load(cls)


@pytest.mark.parametrize("url", MQTT_GOOD)
@pytest.mark.parametrize(("cls", "var", "others"), MQTT_FIELDS)
def test_every_service_accepts_the_same_mqtt_urls(monkeypatch, cls, var, others, url):
    loaded = _load(monkeypatch, cls, {**others, var: url})
    assert getattr(loaded, var.removeprefix("PILOTLAB_").lower()) == url


@pytest.mark.parametrize("url", MQTT_BAD)
@pytest.mark.parametrize(("cls", "var", "others"), MQTT_FIELDS)
def test_every_service_refuses_the_same_mqtt_urls_naming_the_variable(monkeypatch, cls, var, others, url):
    with pytest.raises(s.SettingsError) as e:
        _load(monkeypatch, cls, {**others, var: url})
    assert f"{var}: Value error, must look like mqtt://host:port" in str(e.value)


@pytest.mark.parametrize("url", PG_GOOD)
@pytest.mark.parametrize(("cls", "var", "others"), PG_FIELDS)
def test_every_reader_and_writer_accepts_the_same_postgres_urls(monkeypatch, cls, var, others, url):
    loaded = _load(monkeypatch, cls, {**others, var: url})
    assert getattr(loaded, var.removeprefix("PILOTLAB_").lower()) == url


@pytest.mark.parametrize("url", PG_BAD)
@pytest.mark.parametrize(("cls", "var", "others"), PG_FIELDS)
def test_every_reader_and_writer_refuses_the_same_postgres_urls(monkeypatch, cls, var, others, url):
    with pytest.raises(s.SettingsError) as e:
        _load(monkeypatch, cls, {**others, var: url})
    assert f"{var}: Value error, must look like postgresql://" in str(e.value)


def test_an_optional_broker_may_be_left_unset(monkeypatch):
    loaded = _load(monkeypatch, s.AlertsSettings, {**KAFKA, "PILOTLAB_DATABASE_URL": PG})
    assert loaded.mqtt_url is None


def test_the_reader_url_is_the_one_a_reading_command_uses(monkeypatch):
    reader = "postgresql://grafana_reader:pw@host/db"
    loaded = _load(monkeypatch, s.ReportSettings, {"PILOTLAB_DATABASE_URL": PG, "PILOTLAB_DATABASE_READER_URL": reader})
    assert loaded.database_url == reader
