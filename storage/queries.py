"""Read side used by the demo, reports and tests: thin wrappers over the SQL functions in
``storage/migrations`` (parameters only, never SQL built from strings)."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql


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
