"""Grafana's PostgreSQL query interpolation, reproduced to run the dashboards' SQL without a
Grafana server (tests, ``bench``). Pure functions.

Two steps, in Grafana's order:

1. Template variables (done by Grafana's frontend): ``$name``, ``${name}``, ``${name:format}``
   and ``[[name]]``. For SQL datasources a single-valued variable is inserted with its single
   quotes doubled (the query writes the quotes: ``'$experiment'``); a multi-value or include-all
   variable becomes a comma-separated list of quoted literals. The built-in ``$__interval``
   and ``$__interval_ms`` are variables too. Unknown variables are left as they are.
2. Macros (done by the PostgreSQL datasource's backend, ``macros.go``), with the time range in
   UTC formatted as Go's RFC3339Nano:

   - ``$__time(c)`` → ``c AS "time"``; ``$__timeEpoch(c)`` → ``extract(epoch from c) as "time"``
   - ``$__timeFilter(c)`` → ``c BETWEEN '<from>' AND '<to>'``
   - ``$__timeFrom()`` → ``'<from>'``; ``$__timeTo()`` → ``'<to>'``
   - ``$__timeGroup(c, '5m'[, fill])`` → ``floor(extract(epoch from c)/300)*300``, or with the
     datasource's TimescaleDB option on: ``time_bucket('300.000s',c)``
   - ``$__timeGroupAlias(...)`` → the same plus `` AS "time"``
   - ``$__unixEpochFilter(c)`` → ``c >= <from s> AND c <= <to s>``; ``$__unixEpochFrom()``,
     ``$__unixEpochTo()``; ``$__unixEpochGroup(c, '5m')`` → ``floor((c)/300)*300``
     (``...Alias`` adds `` AS "time"``)

The fill argument of ``$__timeGroup`` only tells Grafana how to fill gaps in the returned
frames; it does not change the SQL.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta


class MacroError(ValueError):
    """A macro Grafana would refuse (unknown name, missing argument, bad interval)."""


_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "M": 30 * 86400, "y": 365 * 86400}
_INTERVAL = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w|M|y)\s*$")


def parse_interval(text: str) -> timedelta:
    """Grafana's ``gtime.ParseInterval``: ``30s``, ``5m``, ``1h``, ``1d``, ``1w``, ``500ms``."""
    m = _INTERVAL.match(text.strip().strip("'"))
    if not m:
        raise MacroError(f"error parsing interval {text}")
    return timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])


def format_interval(td: timedelta) -> str:
    """How Grafana writes ``$__interval``: the largest unit that divides it (``1m``, ``30s``)."""
    ms = round(td.total_seconds() * 1000)
    for unit, secs in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if ms % (secs * 1000) == 0:
            return f"{ms // (secs * 1000)}{unit}"
    return f"{ms}ms"


# Grafana's kbn.roundInterval steps (a raw interval up to the bound rounds to the value)
_ROUND_STEPS = [
    (0.015, 0.010), (0.035, 0.020), (0.075, 0.050), (0.15, 0.100), (0.35, 0.200), (0.75, 0.500),
    (1.5, 1), (3.5, 2), (7.5, 5), (12.5, 10), (17.5, 15), (25, 20), (45, 30), (90, 60), (210, 120),
    (450, 300), (750, 600), (1050, 900), (1500, 1200), (2700, 1800), (5400, 3600), (9000, 7200),
    (16200, 10800), (32400, 21600), (86400, 43200), (604800, 86400), (1814400, 604800),
    (3628800, 2592000),
]


def auto_interval(t_from: datetime, t_to: datetime, max_data_points: int = 1000,
                  min_interval: timedelta = timedelta(seconds=1)) -> timedelta:
    """``$__interval`` as Grafana computes it: the range over the panel's data points,
    rounded to a "nice" step, never below the datasource's minimum interval."""
    raw = (t_to - t_from).total_seconds() / max(max_data_points, 1)
    nice = next((v for bound, v in _ROUND_STEPS if raw < bound), 31536000)
    return max(timedelta(seconds=nice), min_interval)


def go_rfc3339nano(t: datetime) -> str:
    """Go's ``time.RFC3339Nano`` of a UTC instant: trailing zero fractions are dropped."""
    if t.tzinfo is None:
        raise ValueError("timezone-aware datetimes only")
    t = t.astimezone(UTC)
    base = t.strftime("%Y-%m-%dT%H:%M:%S")
    frac = f"{t.microsecond:06d}".rstrip("0")
    return f"{base}.{frac}Z" if frac else f"{base}Z"


def _seconds_repr(seconds: float) -> str:
    """Go's ``%v`` of a float64 seconds value (300 → ``300``, 0.5 → ``0.5``)."""
    return str(int(seconds)) if float(seconds).is_integer() else repr(seconds)


@dataclass(frozen=True)
class Variable:
    """A dashboard variable's current value(s). ``multi`` or ``include_all`` switch on quoting."""

    value: str | Sequence[str]
    multi: bool = False
    include_all: bool = False


def _quote_literal(v: str) -> str:
    return "'" + v.replace("'", "''") + "'"


def _format_variable(var: Variable, fmt: str | None) -> str:
    values = [var.value] if isinstance(var.value, str) else list(var.value)
    if fmt == "raw":
        return ",".join(values)
    if fmt == "csv":
        return ",".join(values)
    if fmt == "singlequote":
        return ",".join(_quote_literal(v) for v in values)
    if fmt == "doublequote":
        return ",".join('"' + v.replace('"', '\\"') + '"' for v in values)
    if fmt is not None:
        raise MacroError(f"unsupported variable format :{fmt}")
    if isinstance(var.value, str) and not (var.multi or var.include_all):
        return var.value.replace("'", "''")
    return ",".join(_quote_literal(v) for v in values)


_VAR = re.compile(r"\$(\w+)|\$\{(\w+)(?::(\w+))?\}|\[\[(\w+)(?::(\w+))?\]\]")


def interpolate_variables(sql: str, variables: Mapping[str, Variable]) -> str:
    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2) or m.group(4)
        fmt = m.group(3) or m.group(5)
        var = variables.get(name)
        return m.group(0) if var is None else _format_variable(var, fmt)

    return _VAR.sub(repl, sql)


_MACRO = re.compile(r"\$__(\w+)\(")


def _split_args(text: str) -> list[str]:
    """Top-level comma split (commas inside parentheses or quotes stay)."""
    args, depth, quote, cur = [], 0, False, []
    for ch in text:
        if ch == "'":
            quote = not quote
        elif not quote and ch == "(":
            depth += 1
        elif not quote and ch == ")":
            depth -= 1
        elif not quote and depth == 0 and ch == ",":
            args.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    tail = "".join(cur).strip()
    if tail or args:
        args.append(tail)
    return args


@dataclass(frozen=True)
class TimeRange:
    t_from: datetime
    t_to: datetime
    timescaledb: bool = False  # the datasource's "TimescaleDB" switch (jsonData.timescaledb)
    extra: dict = field(default_factory=dict)


def _macro(name: str, args: list[str], tr: TimeRange) -> str:
    frm, to = go_rfc3339nano(tr.t_from), go_rfc3339nano(tr.t_to)

    def need(n: int) -> None:
        if len(args) < n or not args[0]:
            raise MacroError(f"missing time column argument for macro $__{name}")

    if name == "time":
        need(1)
        return f'{args[0]} AS "time"'
    if name == "timeEpoch":
        need(1)
        return f'extract(epoch from {args[0]}) as "time"'
    if name == "timeFilter":
        need(1)
        return f"{args[0]} BETWEEN '{frm}' AND '{to}'"
    if name == "timeFrom":
        return f"'{frm}'"
    if name == "timeTo":
        return f"'{to}'"
    if name in ("timeGroup", "timeGroupAlias"):
        if len(args) < 2:
            raise MacroError(f"macro $__{name} needs time column and interval and optional fill value")
        secs = parse_interval(args[1]).total_seconds()
        if secs <= 0:
            raise MacroError(f"interval must be positive, got {args[1]}")
        if tr.timescaledb:
            expr = f"time_bucket('{secs:.3f}s',{args[0]})"
        else:
            expr = f"floor(extract(epoch from {args[0]})/{_seconds_repr(secs)})*{_seconds_repr(secs)}"
        return expr + (' AS "time"' if name == "timeGroupAlias" else "")
    if name == "unixEpochFilter":
        need(1)
        return f"{args[0]} >= {int(tr.t_from.timestamp())} AND {args[0]} <= {int(tr.t_to.timestamp())}"
    if name == "unixEpochFrom":
        return str(int(tr.t_from.timestamp()))
    if name == "unixEpochTo":
        return str(int(tr.t_to.timestamp()))
    if name in ("unixEpochGroup", "unixEpochGroupAlias"):
        if len(args) < 2:
            raise MacroError(f"macro $__{name} needs time column and interval and optional fill value")
        s = _seconds_repr(parse_interval(args[1]).total_seconds())
        return f"floor(({args[0]})/{s})*{s}" + (' AS "time"' if name == "unixEpochGroupAlias" else "")
    raise MacroError(f"undefined macro: $__{name}")


def expand_macros(sql: str, tr: TimeRange) -> str:
    out, pos = [], 0
    while (m := _MACRO.search(sql, pos)) is not None:
        depth, i = 1, m.end()
        while i < len(sql) and depth:
            depth += {"(": 1, ")": -1}.get(sql[i], 0)
            i += 1
        if depth:
            raise MacroError(f"unbalanced parentheses in $__{m.group(1)}(")
        out.append(sql[pos : m.start()])
        out.append(_macro(m.group(1), _split_args(sql[m.end() : i - 1]), tr))
        pos = i
    out.append(sql[pos:])
    return "".join(out)


def interpolate(
    sql: str,
    t_from: datetime,
    t_to: datetime,
    variables: Mapping[str, Variable | str] | None = None,
    *,
    timescaledb: bool = False,
    max_data_points: int = 1000,
) -> str:
    """The SQL Grafana would send to PostgreSQL for this panel query, time range and variables."""
    interval = auto_interval(t_from, t_to, max_data_points)
    vs: dict[str, Variable] = {
        "__interval": Variable(format_interval(interval)),
        "__interval_ms": Variable(str(math.floor(interval.total_seconds() * 1000))),
    }
    for k, v in (variables or {}).items():
        vs[k] = v if isinstance(v, Variable) else Variable(v)
    return expand_macros(interpolate_variables(sql, vs), TimeRange(t_from, t_to, timescaledb))
