"""The embedded stack's MQTT choices that do not need a running broker: ingest subscribes
without ``$share`` on a Mosquitto older than 2.0.12 (restored shared subscriptions receive
nothing until their client is back), and the broker saves on changes."""

from __future__ import annotations

import stat

import pytest

from control import stack


def fake_mosquitto(tmp_path, version: str) -> str:
    path = tmp_path / version / "mosquitto"
    path.parent.mkdir()
    path.write_text(f"#!/bin/sh\necho 'mosquitto version {version}'\necho\necho 'mosquitto is an MQTT broker.'\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.mark.parametrize(
    ("version", "env"),
    [("2.0.11", {"PILOTLAB_INGEST_SHARE_GROUP": ""}), ("2.0.12", {}), ("2.0.18", {}), ("2.1.2", {})],
)
def test_ingest_subscribes_plainly_only_on_a_mosquitto_with_the_share_bug(tmp_path, version, env) -> None:
    binary = fake_mosquitto(tmp_path, version)
    assert stack.mosquitto_version(binary) == tuple(int(x) for x in version.split("."))
    assert stack.ingest_env(binary) == env


def test_another_broker_keeps_the_shared_subscription(tmp_path) -> None:
    assert stack.ingest_env(str(tmp_path / "some-broker")) == {}


def test_on_amqtt_ingest_subscribes_plainly() -> None:
    """amqtt has no shared subscriptions: ``$share/...`` would be a literal filter (refused by
    its ACL), so ingest subscribes plainly, one replica (control/amqtt_broker.py)."""
    assert stack.ingest_env(stack.AMQTT_SCRIPT) == {"PILOTLAB_INGEST_SHARE_GROUP": ""}


def test_the_memory_or_durable_choice_is_checked() -> None:
    with pytest.raises(stack.StackError, match="durable or memory"):
        stack.Stack(kafka_storage="disk")
