"""The database roles in the TimescaleDB mode, on PGlite (see test_timescale_pglite.py).

PGlite has one role, a superuser, so its schema is migrated the way docker-compose volumes
were before the roles: by a superuser. ``storage/roles.sql`` hands it to the owner (the
hypertables with their chunks, compressed ones included, the continuous aggregates with their
materialisations, the policies' jobs); the sink's role writes into the hypertables, a
compressed chunk included, and cannot drop, compress, refresh or delete; the reader reads the
continuous aggregates. PGlite is one session shared by every connection and checks no
password: the roles are taken with SET ROLE on one connection, and always given back. The
database-level ACL (CONNECT, TEMP) is not tested here: PGlite runs in template1, which keeps
its ACL (see 0022); tests/integration/test_db_privileges.py covers it on PostgreSQL 15."""

from __future__ import annotations

import dataclasses

import psycopg
import pytest

from pilotlab.contracts import Reading, ReadingBatch
from storage import roles, writer
from storage.migrate import migrate
from storage.roles import OWNER, READER, WRITER, WRITER_PRIVILEGES
from tests.timescale.data import build, load
from tests.timescale.test_timescale_pglite import _connect, timescale_url  # noqa: F401 - the fixture

pytestmark = pytest.mark.timeout(600)

# the relations TimescaleDB makes for the schema's objects (not its own catalog tables)
TIMESCALE_OBJECTS = (
    r"^(_hyper_|compress_hyper_|_compressed_hypertable_|_materialized_hypertable_|_partial_view_|_direct_view_)"
)


def test_the_roles_in_timescaledb_mode(timescale_url):  # noqa: F811 - the imported fixture
    migrate(timescale_url)
    ds = build("tsr")
    with _connect(timescale_url) as conn:
        assert load(conn, ds, batches_per_statement=1)["readings"] == len(ds.rows())
        conn.execute("SELECT count(compress_chunk(c, if_not_compressed => true)) FROM show_chunks('readings') c")
        roles.bootstrap(conn, {OWNER: "o", WRITER: "w", READER: "r"})

        owners = conn.execute(
            "SELECT DISTINCT pg_get_userbyid(relowner) FROM pg_class"
            " WHERE (relnamespace = 'public'::regnamespace AND relkind IN ('r', 'p', 'v', 'm', 'S'))"
            "    OR (relnamespace = '_timescaledb_internal'::regnamespace AND relname ~ %s)",
            (TIMESCALE_OBJECTS,),
        ).fetchall()
        assert owners == [(OWNER,)]
        chunks = conn.execute(
            "SELECT count(*) FROM pg_class WHERE relnamespace = '_timescaledb_internal'::regnamespace"
            " AND relname ~ '^compress_hyper_' AND pg_get_userbyid(relowner) = %s",
            (OWNER,),
        ).fetchone()[0]
        assert chunks >= 1  # a compressed chunk, the owner's too
        jobs = conn.execute(
            "SELECT DISTINCT owner::text FROM timescaledb_information.jobs WHERE hypertable_name IS NOT NULL"
        ).fetchall()
        assert jobs == [(OWNER,)]
        for table, privileges in WRITER_PRIVILEGES.items():
            for p in ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE"):
                held = conn.execute("SELECT has_table_privilege(%s, %s, %s)", (WRITER, table, p)).fetchone()[0]
                assert held == (p in privileges), (table, p)

        try:
            conn.execute("SET ROLE pilotlab_writer")
            # into a compressed chunk: the stored readings again (nothing), and a new metric
            again = writer.write_readings_unnest(conn, ds.batches[:1])
            assert again == 0
            b = ds.batches[0]
            extra = ReadingBatch(
                b.experiment_id,
                b.device_id,
                b.group,
                b.received_ms,
                (Reading(10_000, b.readings[0].ts_ms, {"co": 0.4}),),
            )
            assert writer.write_readings_unnest(conn, [extra]) == 1
            assert writer.write_late_readings(conn, ds.batches[:1]) > 0
            newer = [dataclasses.replace(k, value=k.value + 1, revision=k.revision + 1) for k in ds.kpis]
            assert writer.write_kpis(conn, newer) == len(newer)
            writer.write_experiments(conn, [ds.experiment.model_copy(update={"devices": ds.experiment.devices[:2]})])
            for sql in (
                "DELETE FROM readings",
                "TRUNCATE readings",
                "SELECT drop_chunks('readings', older_than => now())",
                "SELECT count(compress_chunk(c, if_not_compressed => true)) FROM show_chunks('kpi_values') c",
                "SELECT count(decompress_chunk(c, if_compressed => true)) FROM show_chunks('readings') c",
                "CALL refresh_continuous_aggregate('readings_1m', NULL, NULL)",
                "SELECT remove_retention_policy('readings')",
                "SELECT add_retention_policy('kpi_values', drop_after => INTERVAL '1 day')",
                "CREATE TABLE mine (a int)",
                "SELECT apply_retention()",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(sql)

            conn.execute("RESET ROLE")
            conn.execute("SET ROLE grafana_reader")
            assert (
                conn.execute(
                    "SELECT count(*) FROM readings_1m WHERE experiment_id = %s", (ds.experiment.id,)
                ).fetchone()[0]
                > 0
            )
            assert conn.execute("SELECT count(*) FROM readings_1h").fetchone()[0] > 0
            assert (
                conn.execute(
                    "SELECT count(*) FROM metric_series(%s, 'no2', '1 hour', %s, %s)",
                    (ds.experiment.id, ds.t0, ds.t_end),
                ).fetchone()[0]
                > 0
            )
            for sql in (
                "DELETE FROM readings",
                "INSERT INTO late_readings SELECT * FROM late_readings LIMIT 1",
                "CALL refresh_continuous_aggregate('readings_1h', NULL, NULL)",
                "CREATE TABLE mine (a int)",
                "SELECT lo_create(0)",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(sql)
        finally:
            conn.execute("RESET ROLE")
        stored = conn.execute("SELECT count(*) FROM readings WHERE experiment_id = %s", (ds.experiment.id,)).fetchone()
        assert stored[0] == len(ds.rows()) + 1
