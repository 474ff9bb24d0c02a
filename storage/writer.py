"""Batched, idempotent writes of pipeline records into PostgreSQL/TimescaleDB.

Each ``write_*`` takes decoded records and one open transaction's connection. Rows are
sent as arrays through ``unnest`` (one round trip per table and batch) and land on their
natural keys with ``ON CONFLICT``: replaying a batch changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

import psycopg
from psycopg.types.json import Jsonb

from pilotlab.contracts import DeviceStatus, KpiValue, ReadingBatch, Rejection, from_ms
from pilotlab.manifest import Experiment

# stored_at: the storing statement's timestamp (a replayed row keeps its first one)
_READINGS_SQL = """
INSERT INTO readings (ts, experiment_id, device_id, device_group, metric, value, seq, received_at, stored_at)
SELECT *, statement_timestamp() FROM unnest(%s::timestamptz[], %s::text[], %s::text[], %s::text[], %s::text[],
                                            %s::float8[], %s::int8[], %s::timestamptz[])
ON CONFLICT (device_id, metric, ts) DO NOTHING
"""

_READINGS_MERGE_SQL = """
INSERT INTO readings (ts, experiment_id, device_id, device_group, metric, value, seq, received_at, stored_at)
SELECT ts, experiment_id, device_id, device_group, metric, value, seq, received_at, statement_timestamp()
  FROM readings_staging
ON CONFLICT (device_id, metric, ts) DO NOTHING
"""

_KPIS_SQL = """
INSERT INTO kpi_values AS k (experiment_id, kpi, metric, kind, device_group, window_size_s,
                             window_start, window_end, value, sample_count, revision, details)
SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::int4[],
                     %s::timestamptz[], %s::timestamptz[], %s::float8[], %s::int8[], %s::int4[], %s::jsonb[])
ON CONFLICT (experiment_id, kpi, device_group, window_size_s, window_start) DO UPDATE
   SET value = EXCLUDED.value, sample_count = EXCLUDED.sample_count,
       revision = EXCLUDED.revision, details = EXCLUDED.details, updated_at = now()
 WHERE k.revision < EXCLUDED.revision
"""

_REJECTIONS_SQL = """
INSERT INTO rejections (rejection_id, received_at, reason, detail, topic, experiment_id,
                        device_id, item_index, excerpt)
SELECT * FROM unnest(%s::text[], %s::timestamptz[], %s::text[], %s::text[], %s::text[],
                     %s::text[], %s::text[], %s::int4[], %s::text[])
ON CONFLICT (rejection_id) DO NOTHING
"""


_LATE_READINGS_SQL = """
INSERT INTO late_readings (ts, experiment_id, device_id, device_group, metric, value, seq, received_at)
SELECT * FROM unnest(%s::timestamptz[], %s::text[], %s::text[], %s::text[], %s::text[],
                     %s::float8[], %s::int8[], %s::timestamptz[])
ON CONFLICT (device_id, metric, ts) DO NOTHING
"""

_DEVICE_STATUS_SQL = """
INSERT INTO device_status (experiment_id, device_id, status, ts, last_seen, detail)
SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::timestamptz[], %s::timestamptz[], %s::text[])
ON CONFLICT (device_id, ts, status) DO NOTHING
"""


def reading_columns(batches: Iterable[ReadingBatch]) -> tuple[list, ...]:
    """Reading batches as the eight column arrays of ``readings`` (one row per metric)."""
    cols: tuple[list, ...] = ([], [], [], [], [], [], [], [])
    ts, exp, dev, grp, metric, value, seq, recv = cols
    for b in batches:
        received = from_ms(b.received_ms)
        for r in b.readings:
            t = from_ms(r.ts_ms)
            for name, v in r.metrics.items():
                ts.append(t)
                exp.append(b.experiment_id)
                dev.append(b.device_id)
                grp.append(b.group)
                metric.append(name)
                value.append(v)
                seq.append(r.seq)
                recv.append(received)
    return cols


def write_readings(conn: psycopg.Connection, batches: Iterable[ReadingBatch]) -> int:
    """COPY into a transaction-local staging table, then merge on the natural key: measured
    1.2-2.5x faster than ``unnest`` across batch sizes (bench/bench_sink.py), and as idempotent."""
    cols = reading_columns(batches)
    if not cols[0]:
        return 0
    conn.execute("CREATE TEMP TABLE readings_staging (LIKE readings) ON COMMIT DROP")
    with conn.cursor().copy(
        "COPY readings_staging (ts, experiment_id, device_id, device_group, metric, value, seq, received_at) FROM STDIN"
    ) as cp:
        for row in zip(*cols, strict=True):
            cp.write_row(row)
    n = conn.execute(_READINGS_MERGE_SQL).rowcount
    conn.execute("DROP TABLE readings_staging")  # several writes may share one transaction
    return n


def write_readings_unnest(conn: psycopg.Connection, batches: Iterable[ReadingBatch]) -> int:
    """The same upsert in one statement without COPY (for servers that cannot COPY, e.g. PGlite)."""
    cols = reading_columns(batches)
    if not cols[0]:
        return 0
    return conn.execute(_READINGS_SQL, cols).rowcount


def write_late_readings(conn: psycopg.Connection, batches: Iterable[ReadingBatch]) -> int:
    """Readings the streams worker routed to ``pilotlab.late`` (same shape, own table)."""
    cols = reading_columns(batches)
    if not cols[0]:
        return 0
    return conn.execute(_LATE_READINGS_SQL, cols).rowcount


def write_device_status(conn: psycopg.Connection, statuses: Iterable[DeviceStatus]) -> int:
    rows = list({(s.device_id, s.ts_ms, s.status): s for s in statuses}.values())
    if not rows:
        return 0
    cols = (
        [s.experiment_id for s in rows],
        [s.device_id for s in rows],
        [s.status for s in rows],
        [from_ms(s.ts_ms) for s in rows],
        [from_ms(s.last_seen_ms) if s.last_seen_ms is not None else None for s in rows],
        [s.detail for s in rows],
    )
    return conn.execute(_DEVICE_STATUS_SQL, cols).rowcount


def latest_kpis(values: Iterable[KpiValue]) -> list[KpiValue]:
    """Within one batch keep only the highest revision per KPI window (fewer rows to upsert,
    and an upsert statement may not touch the same row twice)."""
    best: dict[tuple, KpiValue] = {}
    for v in values:
        k = v.key()
        if k not in best or best[k].revision < v.revision:
            best[k] = v
    return list(best.values())


def write_kpis(conn: psycopg.Connection, values: Iterable[KpiValue]) -> int:
    rows = latest_kpis(values)
    if not rows:
        return 0
    cols = (
        [v.experiment_id for v in rows],
        [v.kpi for v in rows],
        [v.metric for v in rows],
        [v.kind for v in rows],
        [v.device_group for v in rows],
        [v.window_size_s for v in rows],
        [from_ms(v.window_start_ms) for v in rows],
        [from_ms(v.window_start_ms + v.window_size_s * 1000) for v in rows],
        [v.value for v in rows],
        [v.sample_count for v in rows],
        [v.revision for v in rows],
        [Jsonb(v.details) if v.details is not None else None for v in rows],
    )
    return conn.execute(_KPIS_SQL, cols).rowcount


def write_rejections(conn: psycopg.Connection, rejections: Iterable[Rejection]) -> int:
    rows = list({r.rejection_id: r for r in rejections}.values())
    if not rows:
        return 0
    cols = (
        [r.rejection_id for r in rows],
        [from_ms(r.received_ms) for r in rows],
        [str(r.reason) for r in rows],
        [r.detail for r in rows],
        [r.topic for r in rows],
        [r.experiment_id for r in rows],
        [r.device_id for r in rows],
        [r.item_index for r in rows],
        [r.excerpt for r in rows],
    )
    return conn.execute(_REJECTIONS_SQL, cols).rowcount


def write_experiments(conn: psycopg.Connection, experiments: Iterable[Experiment]) -> int:
    n = 0
    for e in experiments:
        p = e.periods
        conn.execute(
            """
            INSERT INTO experiments (experiment_id, title, startup, district, lat, lon, baseline_start,
                                     baseline_end, intervention_start, intervention_end, manifest)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb)
            ON CONFLICT (experiment_id) DO UPDATE SET
                title = EXCLUDED.title, startup = EXCLUDED.startup, district = EXCLUDED.district,
                lat = EXCLUDED.lat, lon = EXCLUDED.lon,
                baseline_start = EXCLUDED.baseline_start, baseline_end = EXCLUDED.baseline_end,
                intervention_start = EXCLUDED.intervention_start,
                intervention_end = EXCLUDED.intervention_end,
                manifest = EXCLUDED.manifest, updated_at = now()
            """,
            (
                e.id,
                e.title,
                e.startup,
                e.district,
                e.location.lat,
                e.location.lon,
                p.baseline.start,
                p.baseline.end,
                p.intervention.start,
                p.intervention.end,
                e.to_json().decode(),
            ),
        )
        conn.execute(
            "DELETE FROM devices WHERE experiment_id = %s AND NOT (device_id = ANY(%s))",
            (e.id, [d.id for d in e.devices]),
        )
        conn.cursor().executemany(
            """
            INSERT INTO devices (device_id, experiment_id, kind, device_group, interval_s, lat, lon)
            VALUES (%s, %s, %s, %s, %s, %s, %s)
            ON CONFLICT (device_id) DO UPDATE SET
                experiment_id = EXCLUDED.experiment_id, kind = EXCLUDED.kind,
                device_group = EXCLUDED.device_group, interval_s = EXCLUDED.interval_s,
                lat = EXCLUDED.lat, lon = EXCLUDED.lon
            """,
            [
                (
                    d.id,
                    e.id,
                    d.kind,
                    d.group,
                    d.interval,
                    d.location.lat if d.location else None,
                    d.location.lon if d.location else None,
                )
                for d in e.devices
            ],
        )
        n += 1
    return n
