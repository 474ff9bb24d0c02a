"""Read side used by the demo, reports and tests: thin wrappers over the SQL functions in
``storage/migrations`` (parameters only, never SQL built from strings)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

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


def kpi_period_summary(conn: psycopg.Connection, experiment_id: str) -> list[PeriodValue]:
    rows = conn.execute("SELECT * FROM kpi_period_summary(%s)", (experiment_id,)).fetchall()
    return [PeriodValue(r[0], r[1], r[2], r[3], r[4], r[5], int(r[6]), int(r[7])) for r in rows]


def rejections_by_reason(conn: psycopg.Connection, experiment_id: str | None) -> dict[str, int]:
    rows = conn.execute("SELECT reason, rejections FROM rejections_by_reason(%s)", (experiment_id,))
    return {r[0]: int(r[1]) for r in rows}


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
