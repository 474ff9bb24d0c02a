"""Read side used by the demo, the report, the portal and tests: one named function per SQL
function of the query layer (``storage/migrations``), each returning typed rows
(``psycopg.rows.class_row``), never rows unpacked by position; parameters only, never SQL
built from strings (docs/dashboards.md)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar

import psycopg
from psycopg import sql
from psycopg.rows import class_row


@dataclass(frozen=True)
class PeriodValue:
    kpi: str
    metric: str
    kind: str
    device_group: str
    period: str
    value: float | None
    sample_count: int
    windows: int


T = TypeVar("T")


def _rows(conn: psycopg.Connection, cls: type[T], query: str, params: tuple = ()) -> list[T]:
    with conn.cursor(row_factory=class_row(cls)) as cur:
        return cur.execute(query, params).fetchall()


def kpi_period_summary(conn: psycopg.Connection, experiment_id: str) -> list[PeriodValue]:
    """Each windowed KPI folded over the baseline and the intervention, per group, by its
    kind's period fold (``pilotlab.kpi_kinds``; migration 0040)."""
    return _rows(
        conn,
        PeriodValue,
        "SELECT kpi, metric, kind, device_group, period, value, sample_count::bigint AS sample_count, windows"
        " FROM kpi_period_summary(%s)",
        (experiment_id,),
    )


@dataclass(frozen=True)
class RejectionCount:
    reason: str
    rejections: int
    last_seen: datetime


def rejection_counts(
    conn: psycopg.Connection,
    experiment_id: str | None,
    start: datetime | None = None,
    end: datetime | None = None,
) -> list[RejectionCount]:
    """Rejections per reason (of one experiment, or all), most frequent first."""
    return _rows(conn, RejectionCount, "SELECT * FROM rejections_by_reason(%s, %s, %s)", (experiment_id, start, end))


def rejections_by_reason(conn: psycopg.Connection, experiment_id: str | None) -> dict[str, int]:
    return {r.reason: r.rejections for r in rejection_counts(conn, experiment_id)}


@dataclass(frozen=True)
class ExperimentListed:
    experiment_id: str
    title: str
    startup: str
    district: str


def experiment_list(conn: psycopg.Connection) -> list[ExperimentListed]:
    return _rows(conn, ExperimentListed, "SELECT * FROM experiment_list()")


@dataclass(frozen=True)
class ExperimentInfo:
    experiment_id: str
    title: str
    startup: str
    district: str
    baseline_start: datetime
    baseline_end: datetime
    intervention_start: datetime
    intervention_end: datetime
    manifest: dict | None
    readings: int


def experiment_info(conn: psycopg.Connection, experiment_id: str) -> ExperimentInfo | None:
    """One experiment with its periods, manifest and stored datapoints (None: unknown)."""
    rows = _rows(conn, ExperimentInfo, "SELECT * FROM experiment_info(%s)", (experiment_id,))
    return rows[0] if rows else None


@dataclass(frozen=True)
class ImpactValue:
    """An impact KPI as streams last revised it (``details``: ``streams.impact`` result)."""

    kpi: str
    metric: str
    value: float | None
    sample_count: int
    revision: int
    details: dict | None
    updated_at: datetime


def streams_impact(conn: psycopg.Connection, experiment_id: str) -> list[ImpactValue]:
    return _rows(conn, ImpactValue, "SELECT * FROM streams_impact(%s)", (experiment_id,))


@dataclass(frozen=True)
class MetricBucket:
    bucket: datetime
    device_group: str
    samples: int
    mean: float | None
    min_value: float | None
    max_value: float | None


def metric_series(
    conn: psycopg.Connection, experiment_id: str, metric: str, *, bucket: timedelta, start: datetime, end: datetime
) -> list[MetricBucket]:
    """A metric per group and time bucket, from the minute or hour rollups."""
    return _rows(
        conn,
        MetricBucket,
        "SELECT * FROM metric_series(%s, %s, %s, %s, %s)",
        (experiment_id, metric, bucket, start, end),
    )


@dataclass(frozen=True)
class DeviceHealth:
    device_id: str
    device_group: str
    kind: str
    interval_s: int
    last_seen: datetime | None
    status: str | None
    status_since: datetime | None
    samples: int
    expected: int
    completeness: float | None


def device_health(
    conn: psycopg.Connection, experiment_id: str, start: datetime | None = None, end: datetime | None = None
) -> list[DeviceHealth]:
    """Each device's last sample, last reported status and completeness over [start, end)."""
    return _rows(conn, DeviceHealth, "SELECT * FROM device_health(%s, %s, %s)", (experiment_id, start, end))


def table_counts(conn: psycopg.Connection) -> dict[str, int]:
    out = {}
    for table in ("experiments", "devices", "readings", "kpi_values", "rejections"):
        query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))
        out[table] = conn.execute(query).fetchone()[0]
    return out


@dataclass(frozen=True)
class DevicePeriodSum:
    """One device's readings of a metric in one cell of an impact analysis: the first (b1)
    or second (b2) half of the baseline, or the intervention (i)."""

    device_id: str
    device_group: str
    cell: str
    readings: int
    total: float


def impact_device_periods(conn: psycopg.Connection, experiment_id: str, metric: str) -> list[DevicePeriodSum]:
    with conn.cursor(row_factory=class_row(DevicePeriodSum)) as cur:
        return cur.execute("SELECT * FROM impact_device_periods(%s, %s)", (experiment_id, metric)).fetchall()


@dataclass(frozen=True)
class AlertEpisode:
    """One alert from firing to resolved (or still firing), with its deliveries summed up
    (SQL function ``alert_history``, migration 0023)."""

    alert_id: str
    experiment_id: str
    rule: str
    kind: str
    severity: str
    subject: str
    device_id: str | None
    status: str
    fired_at: datetime
    resolved_at: datetime | None
    threshold: float | None
    value: float | None
    summary: str
    resolved_summary: str | None
    deliveries: int
    delivered: int
    failed: int
    pending: int


def alert_history(
    conn: psycopg.Connection,
    experiment_id: str | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
) -> list[AlertEpisode]:
    """Alerts fired in [start, end) (of one experiment, or all), newest first."""
    with conn.cursor(row_factory=class_row(AlertEpisode)) as cur:
        return cur.execute("SELECT * FROM alert_history(%s, %s, %s)", (experiment_id, start, end)).fetchall()


@dataclass(frozen=True)
class AlertDelivery:
    """One transition of an alert sent to one target, with every attempt (``history``)."""

    delivery_id: str
    alert_id: str
    event: str
    channel: str
    target: str
    status: str
    attempts: int
    last_error: str | None
    delivered_at: datetime | None
    next_attempt_at: datetime
    created_at: datetime
    history: list


def alert_deliveries(conn: psycopg.Connection, alert_id: str) -> list[AlertDelivery]:
    """The deliveries of one alert, oldest first."""
    with conn.cursor(row_factory=class_row(AlertDelivery)) as cur:
        return cur.execute(
            """SELECT delivery_id, alert_id, event, channel, target, status, attempts, last_error, delivered_at,
                      next_attempt_at, created_at, history
                 FROM alert_deliveries WHERE alert_id = %s ORDER BY created_at, event, channel, target""",
            (alert_id,),
        ).fetchall()


@dataclass(frozen=True)
class OpenAlert:
    """An alert still firing (SQL function ``open_alerts``, migration 0041)."""

    alert_id: str
    experiment_id: str
    rule: str
    kind: str
    severity: str
    subject: str
    device_id: str | None
    fired_at: datetime
    threshold: float | None
    value: float | None
    summary: str
    deliveries: int
    delivered: int
    failed: int
    pending: int


def open_alerts(conn: psycopg.Connection, experiment_id: str | None = None) -> list[OpenAlert]:
    """The alerts still firing (of one experiment, or all): most severe, then oldest first."""
    return _rows(conn, OpenAlert, "SELECT * FROM open_alerts(%s)", (experiment_id,))


@dataclass(frozen=True)
class AlertTransition:
    """An alert firing or resolving, at its event time (SQL function ``alert_transitions``)."""

    at: datetime
    event: str
    alert_id: str
    experiment_id: str
    rule: str
    kind: str
    severity: str
    subject: str
    device_id: str | None
    value: float | None
    threshold: float | None
    summary: str | None
    fired_at: datetime


def alert_transitions(
    conn: psycopg.Connection,
    experiment_id: str | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
    limit: int | None = None,
) -> list[AlertTransition]:
    """Transitions in [start, end) (of one experiment, or all), newest first, at most ``limit``."""
    return _rows(
        conn,
        AlertTransition,
        "SELECT * FROM alert_transitions(%s, %s, %s) LIMIT %s",
        (experiment_id, start, end, limit),
    )
