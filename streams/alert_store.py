"""The alert tables (migration 0023) as the alerts service (streams/alerting.py) writes them.

``store_batch`` writes, in the caller's transaction, the transitions of one consumed batch
(idempotent on the natural key; only what is new gets deliveries), their deliveries, the
engine states of the experiments the batch touched and the next Kafka offsets: a restart
resumes from exactly that state and those offsets, so an alert already firing is not fired
again. ``DeliveryStore`` is the delivery queue's side (due rows, attempts).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import psycopg
from psycopg.types.json import Jsonb

from pilotlab.contracts import from_ms
from streams.alerts import Transition
from streams.delivery import HISTORY_KEPT, Delivery, Due

_FIRE_SQL = """
INSERT INTO alerts (alert_id, experiment_id, rule, kind, severity, subject, device_id, status, fired_at,
                    threshold, value, summary)
VALUES (%s, %s, %s, %s, %s, %s, %s, 'firing', %s, %s, %s, %s)
ON CONFLICT DO NOTHING
RETURNING alert_id
"""

_RESOLVE_SQL = """
UPDATE alerts SET status = 'resolved', resolved_at = %s, resolved_value = %s, resolved_summary = %s,
                  resolved_stored_at = now()
 WHERE alert_id = %s AND status = 'firing'
RETURNING alert_id
"""

_DELIVERY_SQL = """
INSERT INTO alert_deliveries (delivery_id, alert_id, event, channel, target, payload)
SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::jsonb[])
ON CONFLICT (delivery_id) DO NOTHING
"""

_STATE_SQL = """
INSERT INTO alert_state (experiment_id, state, updated_at)
SELECT e, s, now() FROM unnest(%s::text[], %s::jsonb[]) AS t (e, s)
ON CONFLICT (experiment_id) DO UPDATE SET state = EXCLUDED.state, updated_at = EXCLUDED.updated_at
"""

_OFFSETS_SQL = """
INSERT INTO alert_offsets (topic, partition, next_offset)
SELECT * FROM unnest(%s::text[], %s::int4[], %s::int8[])
ON CONFLICT (topic, partition) DO UPDATE SET next_offset = EXCLUDED.next_offset
"""


def record_transitions(conn: psycopg.Connection, transitions: Iterable[Transition]) -> list[Transition]:
    """Store each transition in order; returns those that changed the table (a firing not
    stored before, a resolution of an episode still firing). Replays change nothing, and a
    second firing of a subject already firing under the same rule is refused (index
    ``alerts_one_firing``)."""
    new = []
    for t in transitions:
        if t.status == "firing":
            row = conn.execute(
                _FIRE_SQL,
                (
                    t.alert_id,
                    t.experiment_id,
                    t.rule,
                    t.kind,
                    t.severity,
                    t.subject,
                    t.device_id,
                    from_ms(t.fired_at_ms),
                    t.threshold,
                    t.value,
                    t.summary,
                ),
            ).fetchone()
        else:
            row = conn.execute(_RESOLVE_SQL, (from_ms(t.at_ms), t.value, t.summary, t.alert_id)).fetchone()
        if row is not None:
            new.append(t)
    return new


def enqueue(conn: psycopg.Connection, deliveries: Iterable[Delivery]) -> int:
    rows = list({d.delivery_id: d for d in deliveries}.values())
    if not rows:
        return 0
    cols = (
        [d.delivery_id for d in rows],
        [d.alert_id for d in rows],
        [d.event for d in rows],
        [d.channel for d in rows],
        [d.target for d in rows],
        [Jsonb(d.payload) for d in rows],
    )
    return conn.execute(_DELIVERY_SQL, cols).rowcount


def store_batch(
    conn: psycopg.Connection,
    transitions: list[Transition],
    deliveries_of: Callable[[Transition], list[Delivery]],
    states: Mapping[str, dict],
    offsets: Mapping[tuple[str, int], int],
) -> tuple[list[Transition], int]:
    """One consumed batch, in one transaction: the new transitions (returned) with their
    deliveries (counted), the touched states, the offsets to resume from."""
    with conn.transaction():
        new = record_transitions(conn, transitions)
        queued = enqueue(conn, [d for t in new for d in deliveries_of(t)])
        if states:
            conn.execute(_STATE_SQL, (list(states), [Jsonb(s) for s in states.values()]))
        if offsets:
            keys = sorted(offsets)
            conn.execute(_OFFSETS_SQL, ([t for t, _ in keys], [p for _, p in keys], [offsets[k] for k in keys]))
    return new, queued


def load_states(conn: psycopg.Connection) -> dict[str, dict]:
    return dict(conn.execute("SELECT experiment_id, state FROM alert_state").fetchall())


def load_offsets(conn: psycopg.Connection) -> dict[tuple[str, int], int]:
    return {(t, p): o for t, p, o in conn.execute("SELECT topic, partition, next_offset FROM alert_offsets")}


_DUE_SQL = """
SELECT delivery_id, channel, target, payload, attempts
  FROM alert_deliveries
 WHERE status = 'pending' AND next_attempt_at <= now() AND NOT (delivery_id = ANY(%s))
 ORDER BY next_attempt_at, created_at
 LIMIT %s
"""

_ATTEMPT_SQL = """
UPDATE alert_deliveries
   SET attempts = attempts + 1,
       status = %(status)s,
       last_error = %(error)s,
       delivered_at = CASE WHEN %(status)s = 'delivered' THEN now() END,
       next_attempt_at = now() + make_interval(secs => coalesce(%(retry_in)s, 0)),
       history = (SELECT coalesce(jsonb_agg(h ORDER BY n), '[]')
                    FROM (SELECT h, n FROM jsonb_array_elements(
                                 history || jsonb_build_array(jsonb_set(%(entry)s::jsonb, '{at}', to_jsonb(now())))
                             )
                                       WITH ORDINALITY AS e (h, n)
                           ORDER BY n DESC LIMIT %(kept)s) last)
 WHERE delivery_id = %(id)s
"""


class DeliveryStore:
    """The delivery queue's table, through a connection pool (the dispatcher's threads)."""

    def __init__(self, pool) -> None:
        self.pool = pool

    def due(self, limit: int, exclude: set[str]) -> list[Due]:
        with self.pool.connection() as conn:
            rows = conn.execute(_DUE_SQL, (list(exclude), limit)).fetchall()
        return [Due(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    def record_attempt(self, delivery_id: str, status: str, error: str | None, ms: int, retry_in: float | None) -> None:
        entry = {"ok": error is None, "ms": ms, "error": error}
        with self.pool.connection() as conn:
            conn.execute(
                _ATTEMPT_SQL,
                {
                    "status": status,
                    "error": error,
                    "retry_in": retry_in,
                    "entry": Jsonb(entry),
                    "kept": HISTORY_KEPT,
                    "id": delivery_id,
                },
            )
