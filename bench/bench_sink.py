"""Sink write paths into PostgreSQL, side by side in one run, on the same rows:

- ``unnest``: INSERT … SELECT FROM unnest(arrays) ON CONFLICT DO NOTHING (storage/writer.py);
- ``copy+merge``: COPY into a temporary staging table, then INSERT … SELECT … ON CONFLICT;
- ``raw COPY``: COPY straight into an empty ``readings`` (no idempotency): the ceiling.

Each batch is one transaction, as in the sink. Prints rows/s per batch size and each idempotent
path as a ratio of the raw COPY ceiling; a replay of every batch must add no row.

    python bench/bench_sink.py [--rows 200000] [--sizes 500,2000,10000,50000]

Uses PILOTLAB_DATABASE_URL's server when set (a scratch database ``pilotlab_bench`` is created
there), else starts the embedded stack in a temporary directory and stops it afterwards.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pilotlab.contracts import Reading, ReadingBatch, to_ms, utcnow
from storage import writer
from storage.migrate import migrate


def make_batches(rows: int, per_message: int = 50) -> list[ReadingBatch]:
    """``rows`` reading rows (2 metrics per reading) from 40 devices, as ingest forwards them."""
    t0 = utcnow() - timedelta(days=2)
    out, n, seq = [], 0, 0
    while n < rows:
        dev = f"bench-d{seq % 40:02d}"
        readings = tuple(
            Reading(seq + i, to_ms(t0 + timedelta(seconds=seq + i)), {"no2": 30.0 + i % 9, "pm25": 9.0 + i % 5})
            for i in range(per_message)
        )
        out.append(ReadingBatch("bench", dev, "treatment", to_ms(t0), readings))
        n += 2 * per_message
        seq += per_message
    return out


def chunks(batches: list[ReadingBatch], rows_per_txn: int) -> list[list[ReadingBatch]]:
    per = max(1, rows_per_txn // (2 * len(batches[0].readings)))
    return [batches[k : k + per] for k in range(0, len(batches), per)]


def via_unnest(conn: psycopg.Connection, group: list[ReadingBatch]) -> None:
    with conn.transaction():
        writer.write_readings_unnest(conn, group)


def via_copy_merge(conn: psycopg.Connection, group: list[ReadingBatch]) -> None:
    """The sink's own writer (COPY into staging, merge on the natural key)."""
    with conn.transaction():
        writer.write_readings(conn, group)


def via_raw_copy(conn: psycopg.Connection, group: list[ReadingBatch]) -> None:
    cols = writer.reading_columns(group)
    with (
        conn.transaction(),
        conn.cursor().copy(
            "COPY readings (ts, experiment_id, device_id, device_group, metric, value, seq, received_at) FROM STDIN"
        ) as cp,
    ):
        for row in zip(*cols, strict=True):
            cp.write_row(row)


def run(conn: psycopg.Connection, fn, groups, total_rows: int) -> tuple[float, int, int]:
    conn.execute("TRUNCATE readings")
    start = time.perf_counter()
    for g in groups:
        fn(conn, g)
    elapsed = time.perf_counter() - start
    stored = conn.execute("SELECT count(*) FROM readings").fetchone()[0]
    replayed = stored
    if fn is not via_raw_copy:
        for g in groups:  # at-least-once delivery: every batch again
            fn(conn, g)
        replayed = conn.execute("SELECT count(*) FROM readings").fetchone()[0]
    assert stored == total_rows, (fn.__name__, stored, total_rows)
    return total_rows / elapsed, stored, replayed


def bench(url: str, rows: int, sizes: list[int]) -> None:
    migrate(url)
    batches = make_batches(rows)
    total = sum(len(r.metrics) for b in batches for r in b.readings)
    paths = (("unnest", via_unnest), ("copy+merge", via_copy_merge), ("raw COPY", via_raw_copy))
    print(f"{total} rows, {len(batches)} Kafka messages; PostgreSQL {psycopg.connect(url).info.server_version}")
    print(f"{'rows/txn':>9} {'unnest':>12} {'copy+merge':>12} {'raw COPY':>12} {'unnest/COPY':>12} {'merge/COPY':>11}")
    wins = {"unnest": 0, "copy+merge": 0}
    with psycopg.connect(url, autocommit=True) as conn:
        for size in sizes:
            groups = chunks(batches, size)
            rate = {}
            for name, fn in paths:
                r, stored, replayed = run(conn, fn, groups, total)
                assert replayed == stored, f"{name}: replay added rows"
                rate[name] = r
            wins["unnest" if rate["unnest"] >= rate["copy+merge"] else "copy+merge"] += 1
            print(
                f"{size:>9} {rate['unnest']:>10.0f}/s {rate['copy+merge']:>10.0f}/s {rate['raw COPY']:>10.0f}/s"
                f" {rate['unnest'] / rate['raw COPY']:>12.2f} {rate['copy+merge'] / rate['raw COPY']:>11.2f}"
            )
        conn.execute("TRUNCATE readings")
    print(f"faster idempotent path per batch size: unnest {wins['unnest']}, copy+merge {wins['copy+merge']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--sizes", default="500,2000,10000,50000")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    url = os.environ.get("PILOTLAB_DATABASE_URL")
    if url:
        with psycopg.connect(url, autocommit=True) as c:
            if not c.execute("SELECT 1 FROM pg_database WHERE datname = 'pilotlab_bench'").fetchone():
                c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier("pilotlab_bench")))
        bench(psycopg.conninfo.make_conninfo(url, dbname="pilotlab_bench"), args.rows, sizes)
        return
    from control.stack import Stack  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="pilotlab-bench-") as tmp:
        stack = Stack(Path(tmp))
        try:
            bench(stack.up().database_url, args.rows, sizes)
        finally:
            stack.down(purge=True)


if __name__ == "__main__":
    main()
