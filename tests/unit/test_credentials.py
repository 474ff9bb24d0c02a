"""Device credentials and Mosquitto's password/ACL files, generated from the registry (pure
file generation; the broker's behaviour is in tests/integration/test_ingest_auth.py)."""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path

import pytest

from pilotlab import credentials as cr
from pilotlab.manifest import load_manifests

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = load_manifests(ROOT / "control" / "examples" / "experiments")


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="needs mosquitto_passwd")
def test_hash_matches_what_mosquitto_passwd_writes(tmp_path: Path) -> None:
    pw_file = tmp_path / "passwd"
    pw_file.touch()
    subprocess.run(["mosquitto_passwd", "-b", str(pw_file), "dev1", "s3cret!"], check=True)
    hashed = pw_file.read_text().strip().split(":", 1)[1]
    _, kind, iterations, salt, _ = hashed.split("$")
    assert kind == "7"
    assert cr.mosquitto_hash("s3cret!", base64.b64decode(salt), int(iterations)) == hashed
    assert cr.verify_mosquitto_hash("s3cret!", hashed)
    assert not cr.verify_mosquitto_hash("s3cret", hashed)


def test_hashes_are_salted_and_verify() -> None:
    a, b = cr.mosquitto_hash("pw"), cr.mosquitto_hash("pw")
    assert a != b and a.startswith("$7$101$")
    assert cr.verify_mosquitto_hash("pw", a) and cr.verify_mosquitto_hash("pw", b)
    assert not cr.verify_mosquitto_hash("pw", "plain") and not cr.verify_mosquitto_hash("pw", "$6$1$x$y")


def test_passwords_derive_from_the_secret_and_the_username() -> None:
    p = cr.derive_password(b"k1", "aq-lez-01")
    assert p == cr.derive_password(b"k1", "aq-lez-01") and len(p) == 32
    assert p != cr.derive_password(b"k2", "aq-lez-01")
    assert p != cr.derive_password(b"k1", "aq-lez-02")
    assert ":" not in p and " " not in p  # safe in a passwd file, a URL and a shell


def test_acl_gives_each_device_only_its_own_topics() -> None:
    accounts = cr.device_accounts(EXPERIMENTS)
    assert len(accounts) == sum(len(e.devices) for e in EXPERIMENTS)
    acl = "\n".join(line for line in cr.acl_text(accounts).splitlines() if not line.startswith("#"))
    blocks = {b.splitlines()[0]: b.splitlines()[1:] for b in acl.split("\n\n") if b.startswith("user ")}
    assert blocks["user pilotlab"] == ["topic readwrite pilots/#", "topic read $SYS/#"]
    assert blocks["user aq-lez-01"] == [
        "topic write pilots/lez-san-salvario/aq-lez-01/telemetry",
        "topic read pilots/lez-san-salvario/aq-lez-01/feedback",
    ]
    for a in accounts:
        rules = blocks[f"user {a.username}"]
        assert len(rules) == 2 and all("+" not in r and "#" not in r for r in rules)


def test_write_files_and_read_the_accounts_back(tmp_path: Path) -> None:
    secret = cr.load_or_create_secret(tmp_path / "auth" / "secret")
    assert cr.load_or_create_secret(tmp_path / "auth" / "secret") == secret  # created once
    assert (tmp_path / "auth" / "secret").stat().st_mode & 0o777 == 0o600
    accounts = cr.write_files(tmp_path / "auth", secret, cr.device_accounts(EXPERIMENTS))
    users = dict(line.split(":", 1) for line in (tmp_path / "auth" / "passwd").read_text().splitlines())
    assert set(users) == {a.username for a in accounts} | {cr.LAB_USER}
    assert cr.verify_mosquitto_hash(cr.derive_password(secret, "park-01"), users["park-01"])
    assert cr.known_accounts(tmp_path / "auth") == accounts
    assert (tmp_path / "auth" / "passwd").stat().st_mode & 0o777 == 0o600
    for a in accounts:  # hashes only, never a password
        assert cr.derive_password(secret, a.username) not in (tmp_path / "auth" / "passwd").read_text()


def test_a_device_may_not_take_the_lab_account(tmp_path: Path) -> None:
    with pytest.raises(cr.CredentialsError):
        cr.write_files(tmp_path, b"k", [cr.DeviceAccount(cr.LAB_USER, "exp")])


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://127.0.0.1:1883", cr.MqttEndpoint("127.0.0.1", 1883)),
        ("mqtt://lab:p%40ss@broker:1884", cr.MqttEndpoint("broker", 1884, "lab", "p@ss")),
        ("mqtts://broker", cr.MqttEndpoint("broker", 8883, tls=True)),
    ],
)
def test_endpoint_from_url(url: str, expected: cr.MqttEndpoint) -> None:
    assert cr.MqttEndpoint.parse(url) == expected


def test_credentials_round_trip_through_the_url() -> None:
    url = cr.with_credentials("mqtt://127.0.0.1:1883", "pilotlab", "a/b:c@d")
    ep = cr.MqttEndpoint.parse(url)
    assert (ep.username, ep.password, ep.port) == ("pilotlab", "a/b:c@d", 1883)
    assert cr.without_credentials(url) == "mqtt://127.0.0.1:1883"
    assert cr.MqttEndpoint.parse(url, "other", "pw").username == "other"  # explicit settings win
