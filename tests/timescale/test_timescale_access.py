"""Per-startup access in the TimescaleDB mode, on PGlite (docs/access.md, "Limits"): TimescaleDB
refuses row-level security on compressed hypertables, gives chunks their hypertable's grants but
not its policies, and has no row-level security on continuous aggregates. So a startup role gets
no privilege on readings, late_readings, kpi_values, their chunks or the rollups (closed, never a
leak), and reads its own experiments, devices, status, rejections and alerts through the
policies of migration 0030 — and its own time series, with its search_path, through the views of
migration 0044. PGlite is one session: the roles are taken with SET ROLE."""

from __future__ import annotations

import dataclasses

import psycopg
import pytest

from storage import access, roles, writer
from storage.migrate import migrate
from storage.roles import OWNER, READER, WRITER
from tests.timescale.data import build, load
from tests.timescale.test_timescale_pglite import _connect, timescale_url  # noqa: F401 - the fixture

pytestmark = pytest.mark.timeout(600)

TIME_SERIES = ("readings", "late_readings", "kpi_values", "readings_1m", "readings_1h")


def test_startups_in_timescaledb_mode_read_their_own_rows_and_never_the_hypertables(timescale_url):  # noqa: F811
    migrate(timescale_url)
    with _connect(timescale_url) as conn:
        roles.bootstrap(conn, {OWNER: "o", WRITER: "w", READER: "r"})  # the admin functions, as a superuser
        ids = {}
        for suffix, startup in (("tsaa", "ts alpha"), ("tsab", "ts beta")):
            ds = build(suffix)
            ds = dataclasses.replace(ds, experiment=ds.experiment.model_copy(update={"startup": startup}))
            load(conn, ds, batches_per_statement=1)
            writer.write_late_readings(conn, ds.batches[:1])
            ids[startup] = (ds.experiment.id, ds.experiment.devices[0].id)
        conn.execute("SELECT count(compress_chunk(c, if_not_compressed => true)) FROM show_chunks('readings') c")
        conn.execute("CALL refresh_continuous_aggregate('readings_1m', NULL, NULL)")
        conn.execute("CALL refresh_continuous_aggregate('readings_1h', NULL, NULL)")
        g = access.grant(conn, "ts alpha", "timescale")
        chunk = conn.execute("SELECT show_chunks('readings') LIMIT 1").fetchone()[0]
        try:
            conn.execute(psycopg.sql.SQL("SET ROLE {}").format(psycopg.sql.Identifier(g.role)))
            assert conn.execute("SELECT pilotlab_current_startup()").fetchone()[0] == "ts alpha"
            assert conn.execute("SELECT experiment_id FROM experiments").fetchall() == [(ids["ts alpha"][0],)]
            for table in ("devices", "device_status", "rejections"):
                seen = conn.execute(
                    psycopg.sql.SQL("SELECT DISTINCT experiment_id FROM {}").format(psycopg.sql.Identifier(table))
                ).fetchall()
                assert seen == [(ids["ts alpha"][0],)], table
            assert (
                conn.execute("SELECT count(*) FROM devices WHERE device_id = %s", (ids["ts beta"][1],)).fetchone()[0]
                == 0
            )
            for stmt in (
                "SELECT count(*) FROM readings",
                "SELECT count(*) FROM late_readings",
                "SELECT count(*) FROM kpi_values",
                "SELECT count(*) FROM readings_1m",
                "SELECT count(*) FROM readings_1h",
                f"SELECT count(*) FROM {chunk}",  # a chunk carries grants, not policies: none granted
                f"SELECT * FROM kpi_series('{ids['ts beta'][0]}', 'no2_mean_1h')",
                f"SELECT * FROM device_health('{ids['ts alpha'][0]}')",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(stmt)
        finally:
            conn.execute("RESET ROLE")
        # with its own search_path (its login's, set by roles.sql; the portal's, set by
        # access.scoped), the same names read the views of migration 0044: its rows only
        alpha, beta = ids["ts alpha"][0], ids["ts beta"][0]

        def rows_of(rel: str, exp: str) -> int:  # as the superuser
            q = psycopg.sql.SQL("SELECT count(*) FROM public.{} WHERE experiment_id = %s")
            return conn.execute(q.format(psycopg.sql.Identifier(rel)), (exp,)).fetchone()[0]

        own = {rel: rows_of(rel, alpha) for rel in TIME_SERIES}
        assert all(own.values()) and all(rows_of(rel, beta) for rel in TIME_SERIES), own  # rows to tell apart
        for rel in TIME_SERIES:  # the views have the columns of their relations (SELECT * was expanded)
            cols = "SELECT array_agg(attname::text ORDER BY attnum) FROM pg_attribute WHERE attrelid = %s::regclass"
            cols += " AND attnum > 0 AND NOT attisdropped"
            view = conn.execute(cols, (f"pilotlab_startup.{rel}",)).fetchone()[0]
            assert view == conn.execute(cols, (f"public.{rel}",)).fetchone()[0], rel
        series = conn.execute("SELECT count(*) FROM kpi_series(%s, 'no2_mean_1h')", (alpha,)).fetchone()[0]
        health = conn.execute("SELECT * FROM device_health(%s)", (alpha,)).fetchall()
        assert series > 0 and health
        principal = access.Principal("0" * 16, "ts alpha", g.role, "test")
        with access.scoped(conn, principal):
            for rel in TIME_SERIES:
                q = psycopg.sql.SQL("SELECT count(*), count(*) FILTER (WHERE experiment_id <> %s) FROM {}")
                n, foreign = conn.execute(q.format(psycopg.sql.Identifier(rel)), (alpha,)).fetchone()
                assert (n, foreign) == (own[rel], 0), rel
            assert conn.execute("SELECT count(*) FROM readings WHERE experiment_id = %s", (beta,)).fetchone()[0] == 0
            assert conn.execute("SELECT count(*) FROM kpi_series(%s, 'no2_mean_1h')", (alpha,)).fetchone()[0] == series
            assert conn.execute("SELECT count(*) FROM kpi_series(%s, 'no2_mean_1h')", (beta,)).fetchone()[0] == 0
            assert conn.execute("SELECT * FROM device_health(%s)", (alpha,)).fetchall() == health
            assert conn.execute("SELECT * FROM device_health(%s)", (beta,)).fetchall() == []
            # a condition that would fail on another startup's row runs after the view's filter
            probe = "SELECT count(*) FROM readings WHERE 1 / (CASE WHEN experiment_id = %s THEN 0 ELSE 1 END) = 1"
            assert conn.execute(probe, (beta,)).fetchone()[0] == own["readings"]
            # a temporary table standing in for startup_roles (PGlite lets every role make one)
            # changes nothing: the views and pilotlab_current_startup() name public.startup_roles
            conn.execute("CREATE TEMP TABLE startup_roles (startup text, role text) ON COMMIT DROP")
            conn.execute("INSERT INTO startup_roles VALUES ('ts beta', current_user)")
            assert conn.execute("SELECT pilotlab_current_startup()").fetchone()[0] == "ts alpha"
            assert conn.execute("SELECT count(*) FROM readings WHERE experiment_id = %s", (beta,)).fetchone()[0] == 0
            assert conn.execute("SELECT count(*) FROM readings").fetchone()[0] == own["readings"]
        with pytest.raises(psycopg.errors.InsufficientPrivilege), access.scoped(conn, principal):
            conn.execute("SET LOCAL search_path = public")  # its own path without the views: closed
            conn.execute("SELECT count(*) FROM readings")
        for stmt in ("SELECT count(*) FROM public.readings", f"SELECT count(*) FROM {chunk}"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege), access.scoped(conn, principal):
                conn.execute(stmt)  # the hypertable and its chunks themselves stay refused
        # a role that is no startup's reads no row through the views: the superuser, who may
        # read anything, and grafana_reader, who inherits their grant from the startup roles
        for who in (None, READER):
            try:
                if who:
                    conn.execute(psycopg.sql.SQL("SET ROLE {}").format(psycopg.sql.Identifier(who)))
                for rel in TIME_SERIES:
                    q = psycopg.sql.SQL("SELECT count(*) FROM pilotlab_startup.{}")
                    assert conn.execute(q.format(psycopg.sql.Identifier(rel))).fetchone()[0] == 0, (who, rel)
            finally:
                conn.execute("RESET ROLE")
        # the lab's reader still reads all of it
        try:
            conn.execute("SET ROLE grafana_reader")
            exps = {r[0] for r in conn.execute("SELECT DISTINCT experiment_id FROM readings_1h")}
            assert {ids["ts alpha"][0], ids["ts beta"][0]} <= exps
        finally:
            conn.execute("RESET ROLE")
