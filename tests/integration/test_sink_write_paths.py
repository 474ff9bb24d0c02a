"""The sink's two ways of writing readings (storage.writer.write_readings) on the session's
real PostgreSQL, as the sink's role: a plain insert of the staged rows and, when a key is
already stored, the ``ON CONFLICT`` merge it falls back to. Whatever path a batch takes,
``readings`` ends up as the old text-COPY merge (``write_readings_merge``) leaves it: first
value per key, replays add nothing, ``stored_at`` is the storing statement's time."""

from __future__ import annotations

import logging
from dataclasses import replace

import psycopg
import pytest

from pilotlab.contracts import Reading, ReadingBatch, to_ms, utcnow
from storage import writer

pytestmark = pytest.mark.integration

COLUMNS = "device_id, metric, ts, experiment_id, device_group, value, seq, received_at"


def batch(device: str, t0: int, n: int = 3, value: float = 1.5) -> ReadingBatch:
    readings = tuple(Reading(i, t0 + i * 1000, {"no2": value + i, "pm25": value * 2}) for i in range(n))
    return ReadingBatch("wp-exp", device, "treatment", t0 + 60_000, readings)


def stored(conn: psycopg.Connection, prefix: str) -> list[tuple]:
    return conn.execute(
        f"SELECT {COLUMNS} FROM readings WHERE device_id LIKE %s ORDER BY device_id, metric, ts", (prefix + "%",)
    ).fetchall()


def write(conn: psycopg.Connection, fn, batches: list[ReadingBatch]) -> int:
    with conn.transaction():
        return fn(conn, batches)


def renamed(batches: list[ReadingBatch], prefix: str) -> list[ReadingBatch]:
    return [replace(b, device_id=prefix + b.device_id) for b in batches]


@pytest.fixture
def conn(stack_state):
    with psycopg.connect(stack_state.writer_url, autocommit=True) as c:  # as the sink does
        yield c


def test_a_new_batch_is_inserted_without_the_merge_at_the_statement_time(conn, caplog):
    t0 = to_ms(utcnow()) - 3_600_000
    with conn.transaction():
        started = conn.execute("SELECT now()").fetchone()[0]
        conn.execute("SELECT pg_sleep(0.05)")
        with caplog.at_level(logging.INFO, logger="pilotlab.sink"):
            assert writer.write_readings(conn, [batch("wp1-a", t0), batch("wp1-b", t0)]) == 12
    assert "merging" not in caplog.text  # no key was there: no fallback
    got = conn.execute(
        "SELECT count(*), min(stored_at) > %s, count(DISTINCT stored_at) FROM readings WHERE device_id LIKE 'wp1-%%'",
        (started,),
    ).fetchone()
    assert got == (12, True, 1)  # one INSERT statement, after the transaction began


def test_every_path_leaves_the_rows_the_old_merge_leaves(conn, caplog):
    """A sequence with a replay, a conflicting value, a duplicate inside one batch and new rows
    next to stored ones, written by the new path and (under other device ids) by the old one."""
    t0 = to_ms(utcnow()) - 7_200_000
    a, b = batch("a", t0), batch("b", t0)
    steps = [
        ([a], 6),  # new rows: direct COPY
        ([a], 0),  # a replay: all keys there
        ([batch("a", t0, value=99.0), b], 6),  # a conflicting value (kept out) next to new rows
        ([batch("c", t0), batch("c", t0, value=7.0)], 6),  # a duplicate key inside one batch: the first wins
        ([batch("d", t0, n=1)], 2),
    ]
    with caplog.at_level(logging.INFO, logger="pilotlab.sink"):
        for batches, rows in steps:
            assert write(conn, writer.write_readings, renamed(batches, "wp2n-")) == rows
            assert write(conn, writer.write_readings_merge, renamed(batches, "wp2o-")) == rows
    assert caplog.text.count("merging") == 3  # steps 2-4 fell back, 1 and 5 did not
    new, old = stored(conn, "wp2n-"), stored(conn, "wp2o-")
    assert len(new) == 20
    assert [r[1:] for r in new] == [r[1:] for r in old]
    assert [r[0].removeprefix("wp2n-") for r in new] == [r[0].removeprefix("wp2o-") for r in old]
    assert {r[5] for r in new if r[0] == "wp2n-a"} == {1.5, 2.5, 3.5, 3.0}  # not 99
    assert {r[5] for r in new if r[0] == "wp2n-c"} == {1.5, 2.5, 3.5, 3.0}  # not 7


def test_two_writes_in_one_transaction_stage_only_their_own_rows(conn, caplog):
    """The record-by-record path writes each record in the same transaction: the staging table
    is emptied after each write, so the second one does not meet the first one's keys."""
    t0 = to_ms(utcnow()) - 9_000_000
    with conn.transaction(), caplog.at_level(logging.INFO, logger="pilotlab.sink"):
        assert writer.write_readings(conn, [batch("wp5-a", t0)]) == 6
        assert writer.write_readings(conn, [batch("wp5-b", t0)]) == 6
    assert "merging" not in caplog.text
    assert len(stored(conn, "wp5-")) == 12


def test_a_replay_keeps_the_first_stored_at(conn):
    t0 = to_ms(utcnow()) - 10_800_000
    write(conn, writer.write_readings, [batch("wp3-a", t0)])
    first = conn.execute("SELECT device_id, metric, ts, stored_at FROM readings WHERE device_id = 'wp3-a'").fetchall()
    assert write(conn, writer.write_readings, [batch("wp3-a", t0), batch("wp3-b", t0)]) == 6
    again = conn.execute("SELECT device_id, metric, ts, stored_at FROM readings WHERE device_id = 'wp3-a'").fetchall()
    assert sorted(again) == sorted(first)


def test_a_batch_the_encoder_declines_is_refused_as_before(conn):
    """A NUL byte goes the text path: psycopg refuses it with its own message, which the sink's
    record-by-record path stores as the storage_refused detail."""
    t0 = to_ms(utcnow()) - 14_400_000
    with pytest.raises(psycopg.DataError, match="NUL"):
        write(conn, writer.write_readings, [batch("wp4-a", t0), batch("wp4-\x00", t0)])
    assert stored(conn, "wp4-") == []
    assert write(conn, writer.write_readings, [batch("wp4-a", t0)]) == 6
