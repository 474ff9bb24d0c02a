"""The plain-PostgreSQL mode on the session's real PostgreSQL 15: the migrations, the
query layer against figures computed in Python, the read-only Grafana role, and the sink's
record-by-record path that turns a refused row into a ``storage_refused`` rejection."""

from __future__ import annotations

import psycopg
import pytest

from pilotlab.contracts import KafkaTopics, Reading, ReadingBatch
from storage.migrate import available, migrate, status
from storage.sink import Batch, Record, write_batch, write_record_by_record
from tests.timescale.data import build, check_query_layer, load

pytestmark = pytest.mark.integration


def test_migrations_are_recorded_and_reapply_as_a_no_op(stack_state):
    url = stack_state.database_url
    assert migrate(url) == []
    st = status(url)
    assert st["mode"] == "postgresql"
    assert st["applied"] == sorted(m.version for m in available("postgresql"))
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT mode FROM schema_migrations WHERE version = '0004'").fetchone()[0] == "postgresql"
        # the time_bucket() of the plain mode aligns like TimescaleDB's (origin Monday 2000-01-03)
        got = conn.execute(
            "SELECT time_bucket('15 minutes', '2026-03-16 08:22:59+00'::timestamptz),"
            "       time_bucket('1 day', '2026-03-16 08:22:59+00'::timestamptz)"
        ).fetchone()
        assert [t.isoformat() for t in got] == ["2026-03-16T08:15:00+00:00", "2026-03-16T00:00:00+00:00"]
        brin = conn.execute("SELECT indexdef FROM pg_indexes WHERE indexname = 'readings_ts_brin'").fetchone()
        assert "brin" in brin[0]


def test_query_layer_returns_what_python_computes(stack_state):
    ds = build("pg1")
    with psycopg.connect(stack_state.database_url, autocommit=True) as conn:
        first = load(conn, ds)
        assert first["readings"] == len(ds.rows())
        again = load(conn, ds)
        assert again == {"experiments": 1, "readings": 0, "kpis": 0, "device_status": 0, "rejections": 0}
        check_query_layer(conn, ds)


def test_grafana_reader_selects_and_cannot_write(stack_state):
    with psycopg.connect(stack_state.reader_url, autocommit=True) as conn:
        assert conn.execute("SHOW statement_timeout").fetchone()[0] == "30s"
        conn.execute("SELECT count(*) FROM readings").fetchone()
        conn.execute("SELECT count(*) FROM rejections_by_reason(NULL)").fetchone()
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("DELETE FROM readings")
        conn.execute("SET default_transaction_read_only = off")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DELETE FROM readings")


def test_a_refused_record_becomes_a_rejection_and_the_rest_of_the_batch_is_stored(stack_state):
    ds = build("pg2")
    good = ds.batches[0]
    nul = ReadingBatch(
        ds.experiment.id,
        "bad\x00device",
        "treatment",
        good.received_ms,
        (Reading(1, good.readings[0].ts_ms, {"no2": 1.0}),),
    )
    batch = Batch()
    batch.add_record(Record(KafkaTopics.READINGS, 0, 10, good.to_json(), 1))
    batch.add_record(Record(KafkaTopics.READINGS, 0, 11, nul.to_json(), 2))
    batch.add_record(Record(KafkaTopics.READINGS, 0, 12, b"{not json", 3))
    with psycopg.connect(stack_state.writer_url, autocommit=True) as conn:  # as the sink does
        with pytest.raises(psycopg.DataError):
            write_batch(conn, batch)
        counts = write_record_by_record(conn, batch)
        assert counts["readings"] == 2 * len(good.readings)
        assert counts["refused"] == 1
        rows = conn.execute(
            "SELECT detail, device_id, excerpt FROM rejections WHERE reason = 'storage_refused' AND experiment_id = %s",
            (ds.experiment.id,),
        ).fetchall()
        assert len(rows) == 1  # the NUL record (the undecodable one carries no experiment id)
        detail, device_id, excerpt = rows[0]
        assert "NUL" in detail and device_id is None and "\x00" not in excerpt
        undecodable = conn.execute(
            "SELECT count(*) FROM rejections WHERE reason = 'storage_refused' AND detail LIKE 'undecodable%%'"
            " AND excerpt = '{not json'"
        ).fetchone()[0]
        assert undecodable == 1
        # replaying the same records stores nothing twice
        again = write_record_by_record(conn, batch)
        assert again.get("readings", 0) == 0 and again.get("rejections", 0) == 0
        stored = conn.execute(
            "SELECT count(*) FROM readings WHERE device_id = %s AND ts >= %s",
            (good.device_id, ds.t0),
        ).fetchone()[0]
        assert stored == 2 * len(good.readings)


def test_0043_gives_each_reporting_device_without_a_status_its_first_report(stack_state):
    """Migration 0043 on a database that already holds readings: t2 and c1 reported and had
    no status row (the overview counted them as "no status yet"), so each gets "online" at
    its oldest reading; t1 keeps its own two rows; running it again adds nothing."""
    ds = build("pg43")
    sql = next(m for m in available("postgresql") if m.version == "0043").sql
    with psycopg.connect(stack_state.database_url, autocommit=True) as conn:
        load(conn, ds)
        rows = "SELECT device_id, status, ts, detail FROM device_status WHERE experiment_id = %s ORDER BY device_id, ts"
        before = conn.execute(rows, (ds.experiment.id,)).fetchall()
        conn.execute(sql)
        after = conn.execute(rows, (ds.experiment.id,)).fetchall()
        t1, t2, c1 = (d.id for d in ds.experiment.devices)
        added = sorted(set(after) - set(before))
        assert added == [(c1, "online", ds.t0, "first report"), (t2, "online", ds.t0, "first report")]
        assert [r for r in after if r[0] == t1] == [r for r in before if r[0] == t1]
        conn.execute(sql)
        assert conn.execute(rows, (ds.experiment.id,)).fetchall() == after
        # every device of the experiment now has a status, so the overview counts it
        status = conn.execute(
            "SELECT device_id, status FROM device_last_status(%s) ORDER BY device_id", (ds.experiment.id,)
        ).fetchall()
        assert status == [(c1, "online"), (t1, "offline"), (t2, "online")]
