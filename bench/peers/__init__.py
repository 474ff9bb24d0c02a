"""Peers of the end-to-end benchmark: other programs doing pilotlab's job (MQTT telemetry → rows
in PostgreSQL) on the same box, against the embedded stack's Mosquitto and PostgreSQL, so the
benchmark can print pilotlab's throughput and latency as ratios against them.

Peers (``PEERS``), each subscribed to ``pilots/+/+/telemetry`` with QoS 1 as the stack's lab
account (the account ingest uses; a plain subscription, not ingest's shared one):

- ``nodered``: Node-RED (bench/peers/node-red/flow-insert.json): ``mqtt in`` → a Function node
  doing one INSERT per message (every datapoint of the message in one multi-row statement) on a
  ``pg`` Pool — the flow a Node-RED user would write;
- ``nodered-batched``: Node-RED (flow-batched.json): the Function node buffers rows and writes
  them with one ``INSERT ... SELECT FROM unnest(...)`` every ``batch_rows`` rows or
  ``batch_ms`` ms after the first buffered row;
- ``paho-insert``: bench/peers/paho_insert.py, a paho subscriber doing one INSERT per message
  (psycopg 3, autocommit) inside ``on_message``.

Every peer writes ``peer_readings`` (see ``TABLE_DDL``; ``stored_at`` = ``now()`` of the storing
transaction). API (repo root on ``sys.path``)::

    from bench.peers import PEERS, PeerError, ensure_node_red, latency_ms, peer, stored_count

    ensure_node_red()                          # npm ci bench/peers/node-red once; PeerError (one line) if it fails
    with peer("nodered", stack_state, workdir) as p:   # table created + truncated, process started,
        ...publish...                                  # returns once the peer stores what it receives
        last = p.wait_stored(n_datapoints)     # epoch seconds of the last stored row (max(stored_at))
        lat = latency_ms(p.dsn, readings_per_message=10)   # {"p50", "p95", "p99", "messages"}
    # on exit the peer's process group is stopped (SIGTERM, then SIGKILL)

- ``peer(name, state, workdir, *, batch_rows=5000, batch_ms=200, ready_timeout=90)``: context
  manager yielding a ``Peer`` (``name``, ``dsn``, ``pid``, ``log``, ``count()``, ``wait_stored(n,
  timeout)``, ``check_alive()``). Ready means: a probe message on
  ``pilots/peer-probe/peer-probe/telemetry`` has been stored (so the subscription is acknowledged
  and the database path works); the probe rows are then deleted. Node-RED peers need
  ``ensure_node_red()`` first (``peer`` calls it too).
- ``stored_count(dsn)``: datapoints in ``peer_readings``;
- ``latency_ms(dsn, readings_per_message)``: p50/p95/p99 of ``stored_at - ts`` in ms over the last
  reading of each message, i.e. rows with ``seq % R = R - 1`` (the workload numbers a message's
  readings ``seq = message_index * R + j``), one value per (device, ts), computed in SQL;
- ``versions()``: node, node-red and pg versions (for the report).

Throughput = datapoints / (first publish → ``wait_stored``'s result); both clocks are this box's.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import CallbackAPIVersion

from control.stack import StackState
from pilotlab.credentials import MqttEndpoint

HERE = Path(__file__).resolve().parent
NODE_RED_DIR = HERE / "node-red"
NODE_RED_FLOWS = {"nodered": "flow-insert.json", "nodered-batched": "flow-batched.json"}
PEERS = ("nodered", "nodered-batched", "paho-insert")
PROBE_DEVICE = "peer-probe"
PROBE_TOPIC = f"pilots/{PROBE_DEVICE}/{PROBE_DEVICE}/telemetry"

TABLE_DDL = """
CREATE TABLE IF NOT EXISTS peer_readings (
    ts timestamptz NOT NULL,
    device_id text NOT NULL,
    metric text NOT NULL,
    value double precision,
    seq bigint,
    stored_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, metric, ts)
)
"""


class PeerError(RuntimeError):
    """A one-line reason a peer cannot be installed, started or read."""


# --- the table --------------------------------------------------------------------------------


def create_table(dsn: str) -> None:
    """Create ``peer_readings`` if missing and empty it."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(TABLE_DDL)
        conn.execute("TRUNCATE peer_readings")


def stored_count(dsn: str) -> int:
    """Datapoints stored (probe rows excluded)."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM peer_readings WHERE device_id <> %s", [PROBE_DEVICE]).fetchone()
    return int(row[0])


def latency_ms(dsn: str, readings_per_message: int) -> dict[str, float]:
    """p50/p95/p99 of ``stored_at - ts`` (ms) of the last reading of each message."""
    r = int(readings_per_message)
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            """
            SELECT count(*),
                   percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY lat_ms)
            FROM (
                SELECT extract(epoch FROM max(stored_at) - ts) * 1000 AS lat_ms
                FROM peer_readings
                WHERE seq %% %(r)s = %(r)s - 1 AND device_id <> %(probe)s
                GROUP BY device_id, ts
            ) last_readings
            """,
            {"r": r, "probe": PROBE_DEVICE},
        ).fetchone()
    n, pct = row
    if not n:
        raise PeerError("latency_ms: no last reading of any message in peer_readings")
    return {"p50": float(pct[0]), "p95": float(pct[1]), "p99": float(pct[2]), "messages": int(n)}


def _last_stored_at(conn: psycopg.Connection) -> tuple[int, float | None]:
    count, last = conn.execute(
        "SELECT count(*), extract(epoch FROM max(stored_at)) FROM peer_readings WHERE device_id <> %s",
        [PROBE_DEVICE],
    ).fetchone()
    return int(count), (float(last) if last is not None else None)


# --- Node-RED install ------------------------------------------------------------------------


def _node_red_installed() -> bool:
    return all((NODE_RED_DIR / "node_modules" / m / "package.json").exists() for m in ("node-red", "pg"))


def ensure_node_red(timeout: float = 600) -> None:
    """``npm ci`` in bench/peers/node-red when node_modules is missing; PeerError otherwise."""
    if shutil.which("node") is None:
        raise PeerError("the Node-RED peers need Node.js: apt-get install -y nodejs npm")
    if _node_red_installed():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise PeerError("the Node-RED peers need npm to install node-red: apt-get install -y npm")
    try:
        done = subprocess.run(
            [npm, "ci", "--prefix", str(NODE_RED_DIR), "--no-audit", "--no-fund", "--loglevel=error"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise PeerError(f"npm ci --prefix {NODE_RED_DIR} did not finish within {timeout:.0f} s") from exc
    if done.returncode != 0 or not _node_red_installed():
        raise PeerError(f"npm ci --prefix {NODE_RED_DIR} failed (exit {done.returncode}): {_npm_reason(done)}")


def _npm_reason(done: subprocess.CompletedProcess) -> str:
    """npm's first error sentence (it prints a code line, then the message, then usage)."""
    lines = [ln.removeprefix("npm error").strip() for ln in (done.stderr + done.stdout).splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("code ")]
    return lines[0] if lines else "no output"


def versions() -> dict[str, str]:
    """node, node-red and pg versions as installed (empty strings where missing)."""
    out = {"node": "", "node-red": "", "pg": ""}
    node = shutil.which("node")
    if node:
        out["node"] = subprocess.run([node, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    for m in ("node-red", "pg"):
        pkg = NODE_RED_DIR / "node_modules" / m / "package.json"
        if pkg.exists():
            out[m] = json.loads(pkg.read_text())["version"]
    return out


# --- a running peer --------------------------------------------------------------------------


@dataclass
class Peer:
    name: str
    dsn: str
    proc: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise PeerError(f"peer {self.name} exited with code {self.proc.returncode}{_log_tail(self.log)}")

    def count(self) -> int:
        return stored_count(self.dsn)

    def wait_stored(self, expected: int, timeout: float = 600, poll: float = 0.02) -> float:
        """Wait until ``expected`` datapoints are stored; returns the epoch seconds of the last
        stored row (``max(stored_at)``)."""
        deadline = time.monotonic() + timeout
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while True:
                count, last = _last_stored_at(conn)
                if count >= expected and last is not None:
                    return last
                self.check_alive()
                if time.monotonic() > deadline:
                    raise PeerError(f"peer {self.name} stored {count}/{expected} datapoints within {timeout:.0f} s")
                time.sleep(poll)


def _log_tail(log: Path) -> str:
    lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    return f" (see {log}; last line: {lines[-1]})" if lines else f" (see {log})"


def _command(name: str, userdir: Path) -> list[str]:
    if name in NODE_RED_FLOWS:
        userdir.mkdir(parents=True, exist_ok=True)
        # copies: Node-RED may write beside its flow file, the repo's files stay untouched
        shutil.copyfile(NODE_RED_DIR / NODE_RED_FLOWS[name], userdir / "flows.json")
        shutil.copyfile(NODE_RED_DIR / "flows_cred.json", userdir / "flows_cred.json")
        node = shutil.which("node")
        red = NODE_RED_DIR / "node_modules" / "node-red" / "red.js"
        return [node, str(red), "--userDir", str(userdir), "--settings", str(NODE_RED_DIR / "settings.js"),
                "flows.json"]  # fmt: skip
    if name == "paho-insert":
        return [sys.executable, str(HERE / "paho_insert.py")]
    raise PeerError(f"unknown peer {name!r}; choose one of {', '.join(PEERS)}")


def _stop(proc: subprocess.Popen, timeout: float = 15) -> None:
    """Stop the peer's whole process group (it runs in its own session)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is left
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def _wait_ready(p: Peer, ep: MqttEndpoint, timeout: float) -> None:
    """Publish probes until one is stored, then a last one as a fence; delete the probe rows."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"peer-probe-{uuid.uuid4().hex[:8]}")
    ep.configure(client)
    client.connect(ep.host, ep.port)
    client.loop_start()
    deadline = time.monotonic() + timeout
    base = int(time.time() * 1000)
    try:
        with psycopg.connect(p.dsn, autocommit=True) as conn:

            def probe_stored(seq: int) -> bool:
                row = conn.execute(
                    "SELECT count(*) FROM peer_readings WHERE device_id = %s AND seq >= %s", [PROBE_DEVICE, seq]
                ).fetchone()
                return row[0] > 0

            seq, seen = 0, False
            while True:
                payload = json.dumps([{"seq": seq, "ts": base + seq, "metrics": {"probe": 1.0}}])
                client.publish(PROBE_TOPIC, payload, qos=1)
                until = min(deadline, time.monotonic() + 0.5)
                while time.monotonic() < until and not probe_stored(seq if seen else 0):
                    p.check_alive()
                    time.sleep(0.02)
                if probe_stored(seq if seen else 0):
                    if seen:  # the fence is stored too
                        break
                    seen = True
                elif time.monotonic() >= deadline:
                    p.check_alive()
                    raise PeerError(f"peer {p.name} stored no probe message within {timeout:.0f} s{_log_tail(p.log)}")
                seq += 1
            conn.execute("DELETE FROM peer_readings WHERE device_id = %s", [PROBE_DEVICE])
    finally:
        client.disconnect()
        client.loop_stop()


@contextlib.contextmanager
def peer(
    name: str,
    state: StackState,
    workdir: Path,
    *,
    batch_rows: int = 5000,
    batch_ms: int = 200,
    ready_timeout: float = 90,
) -> Iterator[Peer]:
    """Start peer ``name`` against the stack; yields once it stores what it receives; stops it."""
    if name not in PEERS:
        raise PeerError(f"unknown peer {name!r}; choose one of {', '.join(PEERS)}")
    if name in NODE_RED_FLOWS:
        ensure_node_red()
    dsn = state.database_url
    create_table(dsn)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ep = MqttEndpoint.parse(state.mqtt_url)
    env = {
        **os.environ,
        "PEER_MQTT_HOST": ep.host,
        "PEER_MQTT_PORT": str(ep.port),
        "PEER_MQTT_USER": ep.username or "",
        "PEER_MQTT_PASSWORD": ep.password or "",
        "PEER_CLIENT_ID": f"peer-{name}-{uuid.uuid4().hex[:8]}",
        "PEER_DATABASE_URL": dsn,
        "PEER_BATCH_ROWS": str(batch_rows),
        "PEER_BATCH_MS": str(batch_ms),
    }
    log = workdir / f"{name}.log"
    argv = _command(name, workdir / f"{name}-userdir")
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            argv, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    p = Peer(name=name, dsn=dsn, proc=proc, log=log)
    try:
        _wait_ready(p, ep, ready_timeout)
        yield p
    finally:
        _stop(proc)
