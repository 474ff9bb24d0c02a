"""Device credentials and the Mosquitto password and ACL files, generated from the registry.

- Every registered device gets an MQTT account named after its id. Its password is derived
  from the lab's secret (HMAC-SHA256 of the device id), so it is reproducible: the lab hands
  it to the startup with ``pilotlab credentials show DEVICE`` and nothing per device needs
  storing. Changing the secret changes every password.
- The ACL lets a device publish only to ``pilots/{experiment}/{device}/telemetry`` and read
  only ``pilots/{experiment}/{device}/feedback``. The lab's own services (ingest, simulators,
  replays) use one service account, ``pilotlab``, that may read and write ``pilots/#``.
- The password file holds PBKDF2-SHA512 hashes in Mosquitto's own format
  (``$7$iterations$salt$hash``, what ``mosquitto_passwd`` writes), never a password.
- ``sync`` rewrites both files atomically and sends Mosquitto SIGHUP, which makes it reload
  them: a manifest applied while the broker runs gets working credentials without a restart.
- The embedded stack's fallback broker, amqtt (``control/amqtt_broker.py``), gets the same
  accounts and rules in its own formats: ``amqtt-passwd`` (argon2id hashes, what its
  ``FileAuthPlugin`` reads) and ``amqtt-acl.json`` (``publish_acl`` and ``acl``, i.e.
  subscribe, per user, for its ``TopicAccessControlListPlugin``); SIGHUP reloads them too.

Devices are never provisioned from traffic: an account exists only for a registered device.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import signal
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlparse

from pilotlab.contracts import feedback_topic, telemetry_topic
from pilotlab.manifest import Experiment

LAB_USER = "pilotlab"  # the lab's service account (ingest, simulators, replays)
PBKDF2_ITERATIONS = 101  # mosquitto_passwd's default for $7$
PASSWD_FILE, ACL_FILE, SECRET_FILE, DEVICES_FILE = "passwd", "acl", "secret", "devices.json"
AMQTT_PASSWD_FILE, AMQTT_ACL_FILE = "amqtt-passwd", "amqtt-acl.json"
BROKERS = ("mosquitto", "amqtt")  # the embedded stack's MQTT brokers
# argon2id for amqtt's password file. Cheap on purpose: every password here is 32 characters
# derived from a 256-bit secret (192 bits of entropy), which no hash cost protects further, and
# amqtt verifies on its event loop: its default (64 MiB, t=3, p=4) blocked it ~0.4 s per connect.
AMQTT_ARGON2 = {"time_cost": 1, "memory_cost": 8192, "parallelism": 1}


class CredentialsError(RuntimeError):
    """A one-line, actionable reason credentials cannot be produced."""


# --- passwords -------------------------------------------------------------------------------


def derive_password(secret: bytes, username: str) -> str:
    """The password of an account: 32 URL-safe characters derived from the lab's secret."""
    digest = hmac.new(secret, f"pilotlab-mqtt/{username}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode()[:32]


def mosquitto_hash(password: str, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """A password hash in Mosquitto 2's PBKDF2-SHA512 format, as ``mosquitto_passwd`` writes."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_mosquitto_hash(password: str, hashed: str) -> bool:
    try:
        _, kind, iterations, salt, digest = hashed.split("$")
    except ValueError:
        return False
    if kind != "7":
        return False
    got = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(salt), int(iterations))
    return hmac.compare_digest(base64.b64encode(got).decode(), digest)


def load_or_create_secret(path: Path) -> bytes:
    """The lab's secret (created once, mode 0600)."""
    if path.exists():
        return bytes.fromhex(path.read_text().strip())
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value.hex() + "\n")
    return value


# --- what the files say ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceAccount:
    username: str
    experiment_id: str

    @property
    def telemetry(self) -> str:
        return telemetry_topic(self.experiment_id, self.username)

    @property
    def feedback(self) -> str:
        return feedback_topic(self.experiment_id, self.username)


def device_accounts(experiments: Iterable[Experiment]) -> list[DeviceAccount]:
    accounts = [DeviceAccount(d.id, e.id) for e in experiments for d in e.devices]
    return sorted(accounts, key=lambda a: a.username)


def acl_text(accounts: Iterable[DeviceAccount], lab_user: str = LAB_USER) -> str:
    """Mosquitto ACL: the lab's account reads and writes ``pilots/#``; each device writes its
    own telemetry topic and reads its own feedback topic, nothing else."""
    lines = [
        "# generated by pilotlab from the device registry; do not edit (pilotlab credentials sync)",
        f"user {lab_user}",
        "topic readwrite pilots/#",
        "topic read $SYS/#",
        "",
    ]
    for a in accounts:
        lines += [f"user {a.username}", f"topic write {a.telemetry}", f"topic read {a.feedback}", ""]
    return "\n".join(lines)


def passwd_text(passwords: dict[str, str]) -> str:
    return "".join(f"{user}:{mosquitto_hash(pw)}\n" for user, pw in sorted(passwords.items()))


def _write_atomic(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def write_files(
    directory: Path,
    secret: bytes,
    accounts: list[DeviceAccount],
    lab_password: str | None = None,
    mode: int = 0o600,
) -> list[DeviceAccount]:
    """Write ``passwd``, ``acl`` and ``devices.json`` (the accounts, for ``show``) into
    ``directory``. Returns the device accounts."""
    directory.mkdir(parents=True, exist_ok=True)
    passwords = {a.username: derive_password(secret, a.username) for a in accounts}
    if LAB_USER in passwords:
        raise CredentialsError(f"a device may not be called {LAB_USER!r}: it is the lab's service account")
    passwords[LAB_USER] = lab_password or derive_password(secret, LAB_USER)
    _write_atomic(directory / PASSWD_FILE, passwd_text(passwords), mode)
    _write_atomic(directory / ACL_FILE, acl_text(accounts), mode)
    _write_atomic(
        directory / DEVICES_FILE,
        json.dumps({a.username: a.experiment_id for a in accounts}, indent=1),
        mode,
    )
    return accounts


def amqtt_acl(accounts: Iterable[DeviceAccount], lab_user: str = LAB_USER) -> dict[str, dict[str, list[str]]]:
    """The ACL of ``acl_text`` for amqtt: ``publish_acl`` (may publish to) and ``acl`` (may
    subscribe to) per user. A user without an entry may do neither."""
    publish = {lab_user: ["pilots/#"]}
    subscribe = {lab_user: ["pilots/#"]}
    for a in accounts:
        publish[a.username] = [a.telemetry]
        subscribe[a.username] = [a.feedback]
    return {"publish_acl": publish, "acl": subscribe}


def _secret_id(secret: bytes) -> str:
    return hashlib.sha256(b"pilotlab-amqtt-secret-id/" + secret).hexdigest()[:16]


def write_amqtt_files(
    directory: Path,
    secret: bytes,
    accounts: list[DeviceAccount],
    lab_password: str | None = None,
) -> tuple[Path, Path]:
    """amqtt's password file (argon2id) and ACL (JSON) for these accounts, in ``directory``.
    A hash from the previous file is kept while the secret is the same (the password derived
    from it is too), so a sync hashes only new accounts. Returns (passwd, acl)."""
    from argon2 import PasswordHasher  # noqa: PLC0415 - amqtt's dependency; only its stacks need it

    directory.mkdir(parents=True, exist_ok=True)
    passwd_path, acl_path = directory / AMQTT_PASSWD_FILE, directory / AMQTT_ACL_FILE
    header = f"# generated by pilotlab from the device registry; do not edit. secret-id {_secret_id(secret)}"
    previous: dict[str, str] = {}
    if passwd_path.exists():
        lines = passwd_path.read_text().splitlines()
        if lines and lines[0] == header:
            previous = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
    hasher = PasswordHasher(**AMQTT_ARGON2)
    users = [a.username for a in accounts]
    if LAB_USER in users:
        raise CredentialsError(f"a device may not be called {LAB_USER!r}: it is the lab's service account")
    out = [header]
    for user in sorted([*users, LAB_USER]):
        if user == LAB_USER and lab_password is not None:
            hashed = hasher.hash(lab_password)
        else:
            hashed = previous.get(user) or hasher.hash(derive_password(secret, user))
        out.append(f"{user}:{hashed}")
    _write_atomic(passwd_path, "\n".join(out) + "\n", 0o600)
    _write_atomic(acl_path, json.dumps(amqtt_acl(accounts), indent=1) + "\n", 0o600)
    return passwd_path, acl_path


def known_accounts(directory: Path) -> list[DeviceAccount]:
    """The device accounts as of the last ``write_files``."""
    path = directory / DEVICES_FILE
    known = json.loads(path.read_text()) if path.exists() else {}
    return [DeviceAccount(dev, exp) for dev, exp in sorted(known.items())]


def reload_mosquitto(pid: int) -> None:
    """SIGHUP: Mosquitto (and the stack's amqtt) re-read their password and ACL files."""
    os.kill(pid, signal.SIGHUP)


# --- connecting ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MqttEndpoint:
    """Where and as whom to connect, from ``mqtt[s]://[user:password@]host:port``."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False

    @classmethod
    def parse(cls, url: str, username: str | None = None, password: str | None = None) -> MqttEndpoint:
        u = urlparse(url)
        tls = u.scheme == "mqtts"
        return cls(
            host=u.hostname or "127.0.0.1",
            port=u.port or (8883 if tls else 1883),
            username=username or (unquote(u.username) if u.username else None),
            password=password or (unquote(u.password) if u.password else None),
            tls=tls,
        )

    def configure(self, client, ca_file: str | None = None) -> None:
        """Set credentials and TLS on a paho client before ``connect``."""
        if self.username:
            client.username_pw_set(self.username, self.password)
        if self.tls:
            client.tls_set(ca_certs=ca_file, cert_reqs=ssl.CERT_REQUIRED)


def with_credentials(url: str, username: str, password: str) -> str:
    """``mqtt://host:port`` → ``mqtt://user:password@host:port``."""
    u = urlparse(url)
    netloc = f"{quote(username, safe='')}:{quote(password, safe='')}@{u.hostname}:{u.port}"
    return u._replace(netloc=netloc).geturl()


def without_credentials(url: str) -> str:
    u = urlparse(url)
    return u._replace(netloc=f"{u.hostname}:{u.port}").geturl()


# --- the embedded stack's broker -------------------------------------------------------------


def stack_auth_dir(data_dir: Path) -> Path:
    return data_dir / "mosquitto"


def stack_broker(data_dir: Path) -> str:
    """The MQTT broker the stack in ``data_dir`` runs (its state.json): mosquitto or amqtt."""
    try:
        state = json.loads((data_dir / "state.json").read_text())
    except (FileNotFoundError, ValueError):
        return "mosquitto"
    kind = state.get("parts", {}).get("mqtt", {}).get("kind")
    if kind is None:  # a state file from before the fallbacks
        binary = state.get("services", {}).get("mqtt", {}).get("binary", "")
        kind = "amqtt" if binary.endswith("amqtt_broker.py") else "mosquitto"
    return kind


def sync_stack(
    data_dir: Path, mosquitto_pid: int | None, experiments: Iterable[Experiment], broker: str | None = None
) -> list[DeviceAccount]:
    """Regenerate the embedded broker's files from these experiments and reload it (SIGHUP
    to ``mosquitto_pid``: the stack's Mosquitto or amqtt; ``broker``: which, default what the
    stack in ``data_dir`` runs)."""
    broker = broker or stack_broker(data_dir)
    if broker not in BROKERS:
        raise CredentialsError(f"unknown broker {broker!r}: {' or '.join(BROKERS)}")
    directory = stack_auth_dir(data_dir)
    secret = load_or_create_secret(directory / SECRET_FILE)
    accounts = write_files(directory, secret, device_accounts(experiments))
    if broker == "amqtt":
        write_amqtt_files(directory, secret, accounts)
    if mosquitto_pid is not None:
        with contextlib.suppress(ProcessLookupError):
            reload_mosquitto(mosquitto_pid)
    return accounts


def stack_device_password(data_dir: Path, device_id: str) -> str:
    directory = stack_auth_dir(data_dir)
    if not (directory / SECRET_FILE).exists():
        raise CredentialsError(f"no credentials in {directory}: pilotlab stack up")
    return derive_password(load_or_create_secret(directory / SECRET_FILE), device_id)


def prepare_stack_broker(data_dir: Path, broker: str = "mosquitto") -> tuple[Path, Path, str]:
    """Before the embedded broker starts: the secret, and files holding the lab's account
    plus the devices of the last sync. Returns (passwd, acl, the lab account's password):
    Mosquitto's files, or amqtt's with ``broker="amqtt"``."""
    directory = stack_auth_dir(data_dir)
    secret = load_or_create_secret(directory / SECRET_FILE)
    accounts = write_files(directory, secret, known_accounts(directory))
    lab_password = derive_password(secret, LAB_USER)
    if broker == "amqtt":
        passwd, acl = write_amqtt_files(directory, secret, accounts)
        return passwd, acl, lab_password
    return directory / PASSWD_FILE, directory / ACL_FILE, lab_password
