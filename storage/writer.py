"""Batched, idempotent writes of pipeline records into PostgreSQL/TimescaleDB.

Each ``write_*`` takes decoded records and one open transaction's connection. Rows are
sent as arrays through ``unnest`` (one round trip per table and batch) and land on their
natural keys with ``ON CONFLICT``: replaying a batch changes nothing. Readings, the bulk,
go as one binary COPY and a plain insert that falls back to the merge when a key is already
stored (:func:`write_readings`).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import orjson
import psycopg
from psycopg.types.json import Jsonb

from pilotlab.contracts import DeviceStatus, KpiValue, Reading, ReadingBatch, Rejection, from_ms
from pilotlab.manifest import Experiment

log = logging.getLogger("pilotlab.sink")

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


class IncomingReadings(NamedTuple):
    """A ``pilotlab.readings`` value as the sink writes it: :class:`ReadingBatch`'s fields with
    each reading kept as its decoded JSON triple ``[seq, ts_ms, metrics]``. Building one
    ``Reading`` object per reading cost the sink about twice the JSON parse itself; the rows
    are encoded straight from the triples (:func:`encode_readings_copy`)."""

    experiment_id: str
    device_id: str
    group: str
    received_ms: int
    readings: Sequence[Sequence]  # [seq, ts_ms, metrics] each

    @classmethod
    def from_json(cls, raw: bytes) -> IncomingReadings:
        """Decodes what ``ReadingBatch.from_json`` decodes and fails where it fails (the same
        KeyError for a missing field, ValueError or TypeError for a reading that is not a triple)."""
        return cls._of(orjson.loads(raw))

    @classmethod
    def all_from_json(cls, raw: bytes) -> list[IncomingReadings]:
        """The batches of one ``pilotlab.readings`` value: one, or a packed array
        (``ReadingBatch.all_from_json``, which it decodes the same way)."""
        if raw[:1] != b"[":
            return [cls.from_json(raw)]
        return [cls._of(d) for d in orjson.loads(raw)]

    @classmethod
    def _of(cls, d: dict) -> IncomingReadings:
        readings = d["readings"]
        for _seq, _ts_ms, _metrics in readings:  # the shape check of ReadingBatch.from_json
            pass
        return cls(d["experiment_id"], d["device_id"], d["group"], d["received_ms"], readings)

    @classmethod
    def of(cls, b: ReadingBatch | IncomingReadings) -> IncomingReadings:
        if isinstance(b, IncomingReadings):
            return b
        return cls(
            b.experiment_id, b.device_id, b.group, b.received_ms, [(r.seq, r.ts_ms, r.metrics) for r in b.readings]
        )

    def batch(self) -> ReadingBatch:
        return ReadingBatch(*self[:4], tuple(Reading(seq, ts, metrics) for seq, ts, metrics in self.readings))


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


def write_readings_merge(conn: psycopg.Connection, batches: Iterable[ReadingBatch]) -> int:
    """The sink's path before :func:`write_readings`, kept as the reference that the tests and
    bench/bench_sink.py compare it with: text COPY into a staging table created for the
    transaction, then a merge on the natural key (measured 1.2-2.5x faster than ``unnest``)."""
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


# --- readings as one binary COPY buffer ------------------------------------------------------
# psycopg's write_row formats each value through a dumper (the sink's largest CPU cost) and
# text COPY makes the server parse every timestamp and number again. The binary COPY format is
# simple (https://www.postgresql.org/docs/current/sql-copy.html#id-1.9.3.55.9.4), and a
# ReadingBatch repeats most of it: experiment, device, group and received_at per batch, ts and
# seq per reading. So each part is encoded once where it is constant and a row is three joins.

_COPY_COLUMNS = "experiment_id, device_id, device_group, received_at, ts, seq, metric, value"
_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # flags 0, no header extension
_COPY_TRAILER = b"\xff\xff"
_ROW_HEAD = struct.pack(">h", 8)  # fields per row
_PG_EPOCH_MS = 946_684_800_000  # 2000-01-01 UTC: binary timestamptz is µs since then
_LEN = struct.Struct(">i")
_INT8 = struct.Struct(">iq")  # length 8, then a big-endian int64 (int8 and timestamptz)
_TS_SEQ = struct.Struct(">iqiq")
_FLOAT8 = struct.Struct(">id")


class NotEncodable(ValueError):
    """A reading batch holds a value the binary encoder does not take as it is (not a str, int
    or float where one is due, a NUL byte): it goes through text COPY (:func:`_stage`)."""


def _text_field(s: object) -> bytes:
    if type(s) is not str or "\x00" in s:
        raise NotEncodable(f"text field {s!r}")
    b = s.encode()
    return _LEN.pack(len(b)) + b


def _int(v: object) -> int:
    if type(v) is not int:  # bool and float excluded: the text path decides what they become
        raise NotEncodable(f"integer field {v!r}")
    return v


def encode_readings_copy(batches: Sequence[IncomingReadings]) -> tuple[bytes, int]:
    """The rows of ``batches`` as a complete binary COPY stream in the column order
    ``_COPY_COLUMNS``, and the number of rows; the same rows as :func:`reading_columns`."""
    parts = [_COPY_SIGNATURE]
    metric_fields: dict[str, bytes] = {}
    n = 0
    try:
        for b in batches:
            head = (
                _ROW_HEAD
                + _text_field(b.experiment_id)
                + _text_field(b.device_id)
                + _text_field(b.group)
                + _INT8.pack(8, (_int(b.received_ms) - _PG_EPOCH_MS) * 1000)
            )
            for seq, ts_ms, metrics in b.readings:
                prefix = head + _TS_SEQ.pack(8, (_int(ts_ms) - _PG_EPOCH_MS) * 1000, 8, _int(seq))
                for name, v in metrics.items():
                    field = metric_fields.get(name)
                    if field is None:
                        field = metric_fields[name] = _text_field(name)
                    if type(v) is not float and type(v) is not int:
                        raise NotEncodable(f"value {v!r}")
                    parts += (prefix, field, _FLOAT8.pack(8, v))
                    n += 1
    except (struct.error, OverflowError) as exc:  # out of int64 / float8 range
        raise NotEncodable(str(exc)) from exc
    parts.append(_COPY_TRAILER)
    return b"".join(parts), n


# The sink's rows land in a temporary table first: PostgreSQL refuses COPY FROM into a table
# with row-level security (``readings`` has it since migration 0031) for a role it applies
# to, as it does to pilotlab_writer. The table is created once per session (not per batch:
# catalog churn) and emptied at each commit.
_STAGING_SQL = "CREATE TEMP TABLE IF NOT EXISTS readings_incoming (LIKE readings) ON COMMIT DELETE ROWS"

# the common case, no key stored yet: a plain insert, without ON CONFLICT's speculative insertion
_READINGS_INSERT_NEW_SQL = """
INSERT INTO readings (ts, experiment_id, device_id, device_group, metric, value, seq, received_at, stored_at)
SELECT ts, experiment_id, device_id, device_group, metric, value, seq, received_at, statement_timestamp()
  FROM readings_incoming
"""
_READINGS_INSERT_MERGE_SQL = _READINGS_INSERT_NEW_SQL + "ON CONFLICT (device_id, metric, ts) DO NOTHING"


def _stage(conn: psycopg.Connection, batches: list[IncomingReadings]) -> int:
    """Copy the batches' rows into ``readings_incoming``; returns the number of rows. Binary
    COPY from :func:`encode_readings_copy`; text COPY of psycopg's ``write_row`` for a batch
    the encoder declines, so psycopg and the database judge such values exactly as before
    (a NUL byte, say, is refused with psycopg's message and becomes a storage_refused record)."""
    try:
        data, n = encode_readings_copy(batches)
    except NotEncodable as exc:
        log.info("readings written through text COPY: %s", exc)
        cols = reading_columns(b.batch() for b in batches)
        with conn.cursor().copy(
            "COPY readings_incoming (ts, experiment_id, device_id, device_group, metric, value, seq, received_at)"
            " FROM STDIN"
        ) as cp:
            for row in zip(*cols, strict=True):
                cp.write_row(row)
        return len(cols[0])
    if n:
        with conn.cursor().copy(f"COPY readings_incoming ({_COPY_COLUMNS}) FROM STDIN (FORMAT binary)") as cp:
            cp.write(data)
    return n


def write_readings(conn: psycopg.Connection, batches: Iterable[ReadingBatch | IncomingReadings]) -> int:
    """Readings, idempotent on (device_id, metric, ts); must run inside a transaction.

    The rows are copied into the session's ``readings_incoming``, then inserted into
    ``readings`` with a plain INSERT inside a savepoint. Only when a key is already stored (a
    replay after a crash between the database and the offset commit, a record delivered twice,
    a duplicate inside the batch) is the savepoint rolled back and the same staged rows merged
    with ``ON CONFLICT DO NOTHING``: stored rows keep their first value and ``stored_at``, as
    with :func:`write_readings_merge`. Measured against it with ``bench/bench_sink.py``."""
    batches = [IncomingReadings.of(b) for b in batches]
    if not any(b.readings for b in batches):
        return 0
    conn.execute(_STAGING_SQL)
    # Empty before, not after: the commit empties it (ON COMMIT DELETE ROWS), so this scans an
    # empty table except when several writes share one transaction (record by record).
    conn.execute("DELETE FROM readings_incoming")
    n = _stage(conn, batches)
    if n == 0:
        return 0
    try:
        with conn.transaction():  # a savepoint: a duplicate key undoes only this insert
            return conn.execute(_READINGS_INSERT_NEW_SQL).rowcount
    except psycopg.errors.UniqueViolation:
        log.info("a reading of this batch was stored before (a replay): merging %d rows on their key", n)
    return conn.execute(_READINGS_INSERT_MERGE_SQL).rowcount


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
