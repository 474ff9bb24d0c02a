"""The portal's reads (``dashboards/portal``; docs/portal.md): named query functions returning
typed rows (``psycopg.rows.class_row``), parameters only.

None of them filters by startup. A startup's request runs them inside
``storage.access.scoped(conn, principal)``, which switches to the startup's database role: its
row-level security policies decide which experiments, devices, rejections, alerts and KPIs
exist for it. An experiment another startup owns is then simply absent — the same answer as
an id that does not exist at all (the API's 404, never a 403).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg.rows import class_row

from storage.queries import AlertEpisode, DeviceHealth, alert_history


@dataclass(frozen=True)
class ExperimentSummary:
    """One pilot as the overview lists it. ``devices_online``: devices whose last status
    (``device_status``, as everywhere) is online; ``completeness``: distinct
    sample instants received / expected from each device's interval, all devices pooled, over
    the baseline start until now or the intervention end (SQL ``device_health``); ``samples``:
    the instants received over that span (a message or batch item of a device, whatever number
    of metrics it carries); ``rejection_rate``: refused items / (refused + samples), items
    against items."""

    experiment_id: str
    title: str
    startup: str
    district: str
    baseline_start: datetime
    baseline_end: datetime
    intervention_start: datetime
    intervention_end: datetime
    devices_total: int
    devices_online: int
    completeness: float | None
    samples: int
    rejections: int
    rejection_rate: float | None
    open_alerts: int
    last_seen: datetime | None


_SUMMARY_SQL = """
SELECT e.experiment_id, e.title, e.startup, e.district,
       e.baseline_start, e.baseline_end, e.intervention_start, e.intervention_end,
       coalesce(h.devices_total, 0) AS devices_total,
       coalesce(h.devices_online, 0) AS devices_online,
       h.completeness,
       coalesce(h.samples, 0) AS samples,
       j.rejections,
       j.rejections::float8 / nullif(j.rejections + coalesce(h.samples, 0), 0) AS rejection_rate,
       a.open_alerts,
       h.last_seen
  FROM experiments e
 CROSS JOIN LATERAL (
       SELECT count(*) AS devices_total,
              count(*) FILTER (WHERE dh.status = 'online') AS devices_online,
              sum(dh.samples)::float8 / nullif(sum(dh.expected), 0) AS completeness,
              sum(dh.samples)::bigint AS samples,
              max(dh.last_seen) AS last_seen
         FROM device_health(e.experiment_id) dh) h
 CROSS JOIN LATERAL (SELECT count(*) AS rejections FROM rejections x WHERE x.experiment_id = e.experiment_id) j
 CROSS JOIN LATERAL (SELECT count(*) AS open_alerts FROM alerts x
                      WHERE x.experiment_id = e.experiment_id AND x.status = 'firing') a
 WHERE %(experiment_id)s::text IS NULL OR e.experiment_id = %(experiment_id)s
 ORDER BY e.experiment_id
"""


def experiment_summaries(conn: psycopg.Connection) -> list[ExperimentSummary]:
    """Every experiment the connection's role may see, by id."""
    with conn.cursor(row_factory=class_row(ExperimentSummary)) as cur:
        return cur.execute(_SUMMARY_SQL, {"experiment_id": None}).fetchall()


def experiment_summary(conn: psycopg.Connection, experiment_id: str) -> ExperimentSummary | None:
    """One experiment, or None when it does not exist *for this role*."""
    with conn.cursor(row_factory=class_row(ExperimentSummary)) as cur:
        return cur.execute(_SUMMARY_SQL, {"experiment_id": experiment_id}).fetchone()


def device_health(conn: psycopg.Connection, experiment_id: str) -> list[DeviceHealth]:
    """Each device's health over the experiment so far (SQL ``device_health``). Its status is
    the streams worker's, in event time (``device_status``: online at its first reading,
    offline when silent, online when it reports again); a device never seen has none (None)."""
    with conn.cursor(row_factory=class_row(DeviceHealth)) as cur:
        return cur.execute(
            """SELECT device_id, device_group, kind, interval_s, last_seen, status,
                      status_since, samples, expected, completeness
                 FROM device_health(%s)""",
            (experiment_id,),
        ).fetchall()


@dataclass(frozen=True)
class Rejection:
    """A refused message or batch item with the reason code the device was sent, the detail
    and the start of the payload (``excerpt``)."""

    rejection_id: str
    received_at: datetime
    reason: str
    detail: str
    topic: str
    experiment_id: str | None
    device_id: str | None
    item_index: int | None
    excerpt: str


def recent_rejections(conn: psycopg.Connection, experiment_id: str, limit: int = 50) -> list[Rejection]:
    """The newest ``limit`` rejections of an experiment, newest first."""
    with conn.cursor(row_factory=class_row(Rejection)) as cur:
        return cur.execute(
            """SELECT rejection_id, received_at, reason, detail, topic, experiment_id, device_id, item_index,
                      excerpt
                 FROM rejections WHERE experiment_id = %s
                ORDER BY received_at DESC, rejection_id LIMIT %s""",
            (experiment_id, limit),
        ).fetchall()


@dataclass(frozen=True)
class ImpactKpi:
    """An impact KPI as the streams worker last revised it (SQL ``streams_impact``); the
    estimate, interval, verdict and warnings are in ``details``
    (``streams.impact.ImpactResult.as_dict``, read with ``dashboards.impact_text``)."""

    kpi: str
    metric: str
    value: float | None
    sample_count: int
    revision: int
    details: dict | None
    updated_at: datetime


def impacts(conn: psycopg.Connection, experiment_id: str) -> list[ImpactKpi]:
    with conn.cursor(row_factory=class_row(ImpactKpi)) as cur:
        return cur.execute("SELECT * FROM streams_impact(%s)", (experiment_id,)).fetchall()


def alerts(conn: psycopg.Connection, experiment_id: str, limit: int = 100) -> list[AlertEpisode]:
    """An experiment's alerts, firing first, then newest first (at most ``limit``)."""
    rows = alert_history(conn, experiment_id)
    return sorted(rows, key=lambda a: (a.status != "firing", -a.fired_at.timestamp()))[:limit]
