"""Export one experiment's data for a researcher: readings, KPIs and rejections as CSV or
Parquet, with the experiment manifest and the stored impact results beside them, so the
analysis can be redone elsewhere (``streams.impact.estimate_impact`` on the readings gives
the stored impact).

Streamed with bounded memory, whatever the size: CSV through PostgreSQL's ``COPY … TO
STDOUT`` (the server formats, blocks are written as they arrive); Parquet from a server-side
cursor, ``batch_rows`` rows at a time, each batch a row group written by pyarrow. Times are
UTC (ISO 8601 with offset in CSV, ``timestamp[us, UTC]`` in Parquet).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, Literal

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from psycopg import sql

Table = Literal["readings", "kpis", "rejections"]
Format = Literal["csv", "parquet"]
TABLES: tuple[Table, ...] = ("readings", "kpis", "rejections")


class ExportError(ValueError):
    """An export that cannot be made (unknown experiment, bad range)."""


_TS = pa.timestamp("us", tz="UTC")

# each table's columns, in the order written, and the row filter (experiment, [from, to))
_QUERIES: dict[Table, tuple[str, str, pa.Schema]] = {
    "readings": (
        "SELECT ts, device_id, device_group, metric, value, seq, received_at FROM readings"
        " WHERE experiment_id = {exp} AND ts >= {start} AND ts < {end} ORDER BY ts, device_id, metric",
        "ts",
        pa.schema(
            [
                ("ts", _TS),
                ("device_id", pa.string()),
                ("device_group", pa.string()),
                ("metric", pa.string()),
                ("value", pa.float64()),
                ("seq", pa.int64()),
                ("received_at", _TS),
            ]
        ),
    ),
    "kpis": (
        "SELECT window_start, window_end, kpi, metric, kind, device_group, window_size_s, value, sample_count,"
        " revision, details::text AS details FROM kpi_values"
        " WHERE experiment_id = {exp} AND window_start >= {start} AND window_start < {end}"
        " ORDER BY window_start, kpi, device_group",
        "window_start",
        pa.schema(
            [
                ("window_start", _TS),
                ("window_end", _TS),
                ("kpi", pa.string()),
                ("metric", pa.string()),
                ("kind", pa.string()),
                ("device_group", pa.string()),
                ("window_size_s", pa.int32()),
                ("value", pa.float64()),
                ("sample_count", pa.int64()),
                ("revision", pa.int32()),
                ("details", pa.string()),
            ]
        ),
    ),
    "rejections": (
        "SELECT received_at, device_id, reason, detail, item_index, topic, excerpt, rejection_id FROM rejections"
        " WHERE experiment_id = {exp} AND received_at >= {start} AND received_at < {end}"
        " ORDER BY received_at, rejection_id",
        "received_at",
        pa.schema(
            [
                ("received_at", _TS),
                ("device_id", pa.string()),
                ("reason", pa.string()),
                ("detail", pa.string()),
                ("item_index", pa.int32()),
                ("topic", pa.string()),
                ("excerpt", pa.string()),
                ("rejection_id", pa.string()),
            ]
        ),
    ),
}

_FAR_PAST = datetime.fromisoformat("0001-01-01T00:00:00+00:00")
_FAR_FUTURE = datetime.fromisoformat("9999-12-31T00:00:00+00:00")


def query(table: Table, experiment_id: str, start: datetime | None, end: datetime | None) -> sql.Composed:
    text, _, _ = _QUERIES[table]
    return sql.SQL(text).format(
        exp=sql.Literal(experiment_id),
        start=sql.Literal(start or _FAR_PAST),
        end=sql.Literal(end or _FAR_FUTURE),
    )


def write_csv(
    conn: psycopg.Connection,
    table: Table,
    experiment_id: str,
    out: BinaryIO,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
) -> int:
    """COPY the rows as CSV with a header into ``out``; returns the bytes written."""
    copy = sql.SQL("COPY ({}) TO STDOUT WITH (FORMAT csv, HEADER true)").format(query(table, experiment_id, start, end))
    written = 0
    with conn.cursor() as cur, cur.copy(copy) as cp:
        for block in cp:
            out.write(block)
            written += len(block)
    return written


def _batches(conn: psycopg.Connection, q: sql.Composed, schema: pa.Schema, batch_rows: int) -> Iterator[pa.RecordBatch]:
    with conn.cursor(name="pilotlab_export") as cur:  # server-side: rows arrive batch_rows at a time
        cur.itersize = batch_rows
        cur.execute(q)
        while rows := cur.fetchmany(batch_rows):
            columns = list(zip(*rows, strict=True))
            yield pa.record_batch(
                [pa.array(col, type=f.type) for col, f in zip(columns, schema, strict=True)], schema=schema
            )


def write_parquet(
    conn: psycopg.Connection,
    table: Table,
    experiment_id: str,
    path: Path,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    batch_rows: int = 50_000,
) -> int:
    """Write the rows to a Parquet file, one row group per batch; returns the rows written."""
    schema = _QUERIES[table][2]
    rows = 0
    with conn.transaction(), pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for batch in _batches(conn, query(table, experiment_id, start, end), schema, batch_rows):
            writer.write_batch(batch)
            rows += batch.num_rows
    return rows


def export_experiment(
    database_url: str,
    experiment_id: str,
    out_dir: Path,
    *,
    fmt: Format = "csv",
    tables: tuple[Table, ...] = TABLES,
    start: datetime | None = None,
    end: datetime | None = None,
) -> dict[str, Path]:
    """Write ``<table>.<fmt>`` for each table, ``manifest.yaml`` and ``impact.json`` (the stored
    impact of each impact KPI: estimate, interval, verdict, warnings) into ``out_dir``."""
    if start is not None and end is not None and end <= start:
        raise ExportError("--to must be after --from")
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    with psycopg.connect(database_url) as conn:
        # the read-only role's default statement_timeout (30 s) is for dashboards; an export of
        # millions of rows is one long statement, allowed for this session only
        conn.execute("SET statement_timeout = 0")
        row = conn.execute("SELECT manifest FROM experiments WHERE experiment_id = %s", (experiment_id,)).fetchone()
        if row is None:
            raise ExportError(f"no experiment {experiment_id!r} in this database")
        manifest = out_dir / "manifest.yaml"
        manifest.write_text(yaml.safe_dump(row[0], sort_keys=False, allow_unicode=True))
        written["manifest"] = manifest
        impacts = conn.execute(
            "SELECT kpi, metric, value, sample_count, revision, details FROM streams_impact(%s)", (experiment_id,)
        ).fetchall()
        impact = out_dir / "impact.json"
        impact.write_text(
            json.dumps(
                [
                    {"kpi": k, "metric": m, "estimate": v, "readings": n, "revision": r, "details": d}
                    for k, m, v, n, r, d in impacts
                ],
                indent=1,
                default=str,
            )
        )
        written["impact"] = impact
        for table in tables:
            path = out_dir / f"{table}.{fmt}"
            if fmt == "csv":
                with path.open("wb") as f:
                    write_csv(conn, table, experiment_id, f, start=start, end=end)
            else:
                write_parquet(conn, table, experiment_id, path, start=start, end=end)
            written[table] = path
    return written
