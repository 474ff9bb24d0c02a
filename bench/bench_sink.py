"""Sink write paths into PostgreSQL, side by side in one run, on the same rows:

- ``unnest``: INSERT … SELECT FROM unnest(arrays) ON CONFLICT DO NOTHING (storage/writer.py);
- ``copy+merge``: COPY into a temporary staging table, then INSERT … SELECT … ON CONFLICT;
- ``raw COPY``: COPY straight into an empty ``readings`` (no idempotency): the ceiling.

Each batch is one transaction, as in the sink. Prints rows/s per batch size and each idempotent
path as a ratio of the raw COPY ceiling; a replay of every batch must add no row.

Then CPU per row of the sink's write of ``pilotlab.readings``, old path against new, on the
end-to-end workload (200 devices, each Kafka record 10 readings × 3 metrics; about 8,000 rows
per transaction, what the sink gathers in its 200 ms wait at 40,000 dp/s): the sink's own CPU
(decoding the Kafka values and writing, ``time.process_time``) and the PostgreSQL backend's
(``/proc/<pid>/stat`` of the connection's server process; the WAL writer and checkpointer are
not in it), as the sink's role ``pilotlab_writer``, best of ``--repeat`` runs each, for a first
delivery and for a replay of every record (which the new path merges on the key):

- ``old``: ``ReadingBatch.from_json``, text COPY of psycopg ``write_row`` into a staging table
  created per transaction, then ``INSERT … SELECT … ON CONFLICT DO NOTHING``
  (``writer.write_readings_merge``);
- ``new``: ``writer.IncomingReadings.from_json`` (no object per reading), one binary COPY
  buffer into the session's staging table, a plain ``INSERT … SELECT`` in a savepoint, the
  ``ON CONFLICT`` merge only when a key is already there (``writer.write_readings``).

    python bench/bench_sink.py [--rows 200000] [--sizes 500,2000,10000,50000] [--cpu-rows 480000] [--repeat 3]

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

from pilotlab.contracts import KafkaTopics, Reading, ReadingBatch, to_ms, utcnow
from storage import writer
from storage.migrate import migrate
from storage.sink import Record

TICK = os.sysconf("SC_CLK_TCK")


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
    """The sink's writer before the direct binary COPY (text COPY into staging, merge on the key)."""
    with conn.transaction():
        writer.write_readings_merge(conn, group)


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


def e2e_records(rows: int, devices: int = 200, per_message: int = 10) -> list[Record]:
    """``rows`` reading rows as Kafka records of the end-to-end workload (bench/e2e/load.py):
    each record one device's 10 readings × 3 metrics, devices in turn, 1 s apart."""
    t0 = to_ms(utcnow() - timedelta(days=2))
    out, n, k = [], 0, 0
    while n < rows:
        dev, step = k % devices, k // devices
        readings = tuple(
            Reading(step * per_message + i, t0 + (step * per_message + i) * 1000,
                    {"no2": 30.0 + (k + i) % 17 * 0.5, "pm25": 9.0 + i % 5, "temperature": 18.25 + i % 3})
            for i in range(per_message)
        )  # fmt: skip
        group = "treatment" if dev % 2 else "control"
        value = ReadingBatch("bench-e2e", f"bench-dev-{dev:03d}", group, t0 + step * 10_000, readings).to_json()
        out.append(Record(KafkaTopics.READINGS, dev % 4, k, value, t0))
        n += 3 * per_message
        k += 1
    return out


def backend_cpu_s(pid: int) -> float:
    """utime + stime of one server process (``/proc/<pid>/stat``, fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def timed_writes(conn: psycopg.Connection, decode, write, groups: list[list[Record]]) -> tuple[float, float, int]:
    """Decode and write each group's Kafka values in one transaction, as the sink does; returns
    the sink's and the backend's CPU seconds and the rows the writes reported."""
    pid = conn.info.backend_pid
    pg0, me0 = backend_cpu_s(pid), time.process_time()
    written = 0
    for g in groups:
        decoded = [decode(rec.value) for rec in g]
        with conn.transaction():
            written += write(conn, decoded)
    return time.process_time() - me0, backend_cpu_s(pid) - pg0, written


def bench_cpu(owner_url: str, writer_url: str, rows: int, repeat: int, rows_per_txn: int = 8_000) -> None:
    """Writes as ``writer_url``'s role (the sink's, which row-level security applies to),
    empties ``readings`` as the owner."""
    records = e2e_records(rows)
    total = 30 * len(records)
    groups = [records[k : k + rows_per_txn // 30] for k in range(0, len(records), rows_per_txn // 30)]
    paths = (
        ("old", ReadingBatch.from_json, writer.write_readings_merge),
        ("new", writer.IncomingReadings.from_json, writer.write_readings),
    )
    best: dict[tuple[str, str], tuple[float, float]] = {}
    with psycopg.connect(owner_url, autocommit=True) as owner, psycopg.connect(writer_url, autocommit=True) as conn:
        for _ in range(repeat):
            for name, decode, write in paths:
                owner.execute("TRUNCATE readings")
                for phase in ("first", "replay"):
                    sink_s, pg_s, written = timed_writes(conn, decode, write, groups)
                    stored = conn.execute("SELECT count(*) FROM readings").fetchone()[0]
                    assert stored == total, (name, phase, stored, total)
                    assert written == (total if phase == "first" else 0), (name, phase, written)
                    key = (name, phase)
                    prev = best.get(key)
                    if prev is None or sink_s + pg_s < sum(prev):
                        best[key] = (sink_s, pg_s)
            unstamped = conn.execute("SELECT count(*) FROM readings WHERE stored_at IS NULL").fetchone()[0]
            assert unstamped == 0, f"{unstamped} rows without stored_at"
        owner.execute("TRUNCATE readings")
    print(f"\nCPU per row, {total} rows in {len(groups)} transactions of {rows_per_txn} rows "
          f"(best of {repeat}; µs per row)")  # fmt: skip
    print(f"{'path':<6} {'delivery':<8} {'sink':>7} {'PostgreSQL':>11} {'both':>7}")
    for (name, phase), (sink_s, pg_s) in best.items():
        print(f"{name:<6} {phase:<8} {sink_s / total * 1e6:>7.2f} {pg_s / total * 1e6:>11.2f} "
              f"{(sink_s + pg_s) / total * 1e6:>7.2f}")  # fmt: skip


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
    ap.add_argument("--sizes", default="500,2000,10000,50000", help="rows per transaction; '' skips the table")
    ap.add_argument("--cpu-rows", type=int, default=480_000, help="rows of the CPU comparison; 0 skips it")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each path in the CPU comparison (best kept)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]

    def both(db_url: str, writer_url: str) -> None:
        if sizes:
            bench(db_url, args.rows, sizes)
        if args.cpu_rows:
            migrate(db_url)
            bench_cpu(db_url, writer_url, args.cpu_rows, args.repeat)

    url = os.environ.get("PILOTLAB_DATABASE_URL")
    if url:
        with psycopg.connect(url, autocommit=True) as c:
            if not c.execute("SELECT 1 FROM pg_database WHERE datname = 'pilotlab_bench'").fetchone():
                c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier("pilotlab_bench")))
        scratch = psycopg.conninfo.make_conninfo(url, dbname="pilotlab_bench")
        both(scratch, scratch)  # one role for both: row-level security may not apply to it
        return
    from control.stack import Stack  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="pilotlab-bench-") as tmp:
        stack = Stack(Path(tmp))
        try:
            state = stack.up()
            both(state.owner_url, state.writer_url)
        finally:
            stack.down(purge=True)


if __name__ == "__main__":
    main()
