"""What each panel type needs from its query's result, checked on real query results (the
integration tests run every panel's SQL against the database). Pure functions."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from datetime import datetime
from decimal import Decimal

NUMERIC = (int, float, Decimal)


def _kind(values: Sequence[object]) -> str:
    """A column's kind from its non-null values: time, number, text, other or empty."""
    present = [v for v in values if v is not None]
    if not present:
        return "empty"
    if all(isinstance(v, datetime) for v in present):
        return "time"
    if all(isinstance(v, NUMERIC) and not isinstance(v, bool) for v in present):
        return "number"
    if all(isinstance(v, str) for v in present):
        return "text"
    return "other"


def result_problems(panel_type: str, fmt: str, columns: Sequence[str], rows: Sequence[Sequence[object]],
                    fields: str = "") -> list[str]:
    """Why a query result cannot feed this panel type (empty list: it can).

    - timeseries (time-series format): a ``time`` column of timestamps or epoch numbers, sorted,
      and at least one numeric value column;
    - stat: at least one numeric column — or, when the panel's reduce options pick ``fields``
      (a column name or a ``/regex/``, see :func:`stat_fields`), a picked column with numbers or
      text (a stat of text values, such as a verdict); table: any columns;
    - geomap: numeric ``latitude`` and ``longitude`` columns;
    - barchart: a text (or time) column for the x axis and at least one numeric column.
    Every panel needs at least one row: a panel proven on an empty result proves nothing.
    """
    if not rows:
        return ["no rows"]
    kinds = {c: _kind([r[i] for r in rows]) for i, c in enumerate(columns)}
    numeric = [c for c, k in kinds.items() if k == "number"]
    problems = []
    if panel_type == "timeseries":
        if fmt != "time_series":
            problems.append(f"format is {fmt!r}, not 'time_series'")
        if "time" not in kinds:
            problems.append("no column named time")
        elif kinds["time"] not in ("time", "number"):
            problems.append(f"the time column holds {kinds['time']}")
        else:
            times = [r[list(columns).index("time")] for r in rows]
            if times != sorted(times):
                problems.append("rows are not sorted by time")
        if not [c for c in numeric if c != "time"]:
            problems.append("no numeric value column")
    elif panel_type == "stat":
        if fields:
            picked = [c for c in columns if _picks(fields, c)]
            if not picked:
                problems.append(f"no column matches the fields option {fields!r}")
            elif not any(kinds[c] in ("number", "text") for c in picked):
                problems.append(f"the column picked by {fields!r} holds no number or text")
        elif not numeric:
            problems.append("no numeric column")
    elif panel_type == "geomap":
        for c in ("latitude", "longitude"):
            if kinds.get(c) != "number":
                problems.append(f"no numeric {c} column")
    elif panel_type == "barchart":
        if not any(k in ("text", "time") for k in kinds.values()):
            problems.append("no text or time column for the x axis")
        if not numeric:
            problems.append("no numeric column")
    elif panel_type != "table":
        problems.append(f"unknown panel type {panel_type}")
    return problems


def _picks(fields: str, column: str) -> bool:
    """Whether Grafana's reduce option ``fields`` (a field name or ``/regex/``) picks ``column``."""
    if len(fields) > 1 and fields.startswith("/") and fields.endswith("/"):
        return re.search(fields[1:-1], column) is not None
    return fields == column


def stat_fields(panel: dict) -> str:
    """The ``fields`` reduce option of a panel ("" : Grafana's default, the numeric fields)."""
    return ((panel.get("options") or {}).get("reduceOptions") or {}).get("fields") or ""


def targets(model: dict) -> Iterator[tuple[dict, dict]]:
    """(panel, target) for every query of a dashboard model."""
    for panel in model.get("panels", []):
        for target in panel.get("targets") or []:
            yield panel, target


def sql_targets(model: dict) -> Iterator[tuple[dict, dict]]:
    """(panel, target) for every SQL query (the database's; the integration tests run them)."""
    for panel, target in targets(model):
        if "rawSql" in target:
            yield panel, target


def prom_targets(model: dict) -> Iterator[tuple[dict, dict]]:
    """(panel, target) for every PromQL query (the services' own metrics, via Prometheus)."""
    for panel, target in targets(model):
        if "expr" in target:
            yield panel, target


PROM_METRIC = re.compile(r"\b(pilotlab_[a-z0-9_]+)\b")


def prom_metric_names(expr: str) -> set[str]:
    """The pilotlab metric names a PromQL expression reads."""
    return set(PROM_METRIC.findall(expr))
