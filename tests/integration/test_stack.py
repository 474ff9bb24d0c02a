"""``pilotlab stack`` as a user drives it: up, idempotent up, status --json, busy port, down."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from control.stack import pid_alive

pytestmark = pytest.mark.integration


def cli(*args: str, data_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "control", "stack", *args, "--data-dir", str(data_dir)],
        capture_output=True, text=True, timeout=120, check=False,
    )


def test_stack_lifecycle(tmp_path: Path):
    data = tmp_path / "stack"
    try:
        up = cli("up", "--json", data_dir=data)
        assert up.returncode == 0, up.stderr
        first = json.loads(up.stdout)
        assert first["up"] is True
        # (plus PILOTLAB_INGEST_SHARE_GROUP with a Mosquitto older than 2.0.12: stack.ingest_env)
        assert set(first["endpoints"]) - {"PILOTLAB_INGEST_SHARE_GROUP"} == {
            "PILOTLAB_MQTT_URL",
            "PILOTLAB_KAFKA_BOOTSTRAP",
            "PILOTLAB_DATABASE_URL",  # the sink's role
            "PILOTLAB_DATABASE_OWNER_URL",  # db migrate
            "PILOTLAB_DATABASE_READER_URL",  # report, plan
        }
        assert first["database_mode"] == "postgresql"
        # which program runs each part with a fallback, and why (the system's, else PyPI's)
        assert first["parts"]["mqtt"]["kind"] in ("mosquitto", "amqtt")
        assert first["parts"]["postgres"]["kind"] in ("system", "embedded")
        assert all(part["why"] for part in first["parts"].values())
        pids = {name: svc["pid"] for name, svc in first["services"].items()}

        again = json.loads(cli("up", "--json", data_dir=data).stdout)
        assert {name: svc["pid"] for name, svc in again["services"].items()} == pids, "second up restarts nothing"

        status = cli("status", "--json", data_dir=data)
        assert status.returncode == 0
        assert json.loads(status.stdout)["endpoints"] == first["endpoints"]

        down = cli("down", data_dir=data)
        assert down.returncode == 0
        binaries = {name: svc["binary"] for name, svc in first["services"].items()}
        assert not any(pid_alive(pid, binaries[name]) for name, pid in pids.items())
        assert cli("status", data_dir=data).returncode == 3  # not up
    finally:
        cli("down", data_dir=data)


def test_busy_port_is_a_one_line_error(tmp_path: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        data = tmp_path / "busy"
        try:
            result = cli("up", "--kafka-port", str(busy), data_dir=data)
        finally:
            cli("down", data_dir=data)
    assert result.returncode == 1
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("note:")]  # fallbacks say so
    assert lines == [f"error: kafka: port {busy} on 127.0.0.1 is in use; free it or choose another port"]


def test_missing_binary_says_what_to_install(tmp_path: Path):
    # auto: the system's PostgreSQL is looked for (a forced fallback would not look)
    env = {**os.environ, "PILOTLAB_PG_BINDIR": str(tmp_path / "no-such-dir"), "PILOTLAB_STACK_POSTGRES": "auto"}
    data = tmp_path / "nobin"
    try:
        result = subprocess.run(
            [sys.executable, "-m", "control", "stack", "up", "--data-dir", str(data)],
            capture_output=True, text=True, timeout=120, env=env, check=False,
        )
    finally:
        cli("down", data_dir=data)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: PILOTLAB_PG_BINDIR={tmp_path / 'no-such-dir'} holds no initdb and postgres programs; "
                      "fix or unset it"]
    assert "Traceback" not in result.stderr


def test_purging_down_deletes_postgres_data_kept_outside_the_data_dir(tmp_path: Path):
    from control.stack import Stack  # noqa: PLC0415

    stack = Stack(tmp_path / "stack")
    state = stack.up()
    try:
        pg_data = Path(state.postgres_data)
        assert pg_data.exists()
        outside = (tmp_path / "stack").resolve() not in pg_data.resolve().parents
    finally:
        stack.down(purge=True)
    if not outside:
        pytest.skip("PostgreSQL could keep its data inside the data dir here (not running as root)")
    assert not pg_data.exists()  # tests and benchmarks no longer leave /tmp/pilotlab-postgres-* behind
