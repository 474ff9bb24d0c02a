"""SenML JSON (RFC 8428) on the telemetry topic: a pack (a JSON array of records) → readings.

Pure, like ``decode``: records in, readings and reason-coded errors out, never an exception.

How pilotlab reads a pack:

- base fields (``bn``, ``bt``, ``bu``, ``bv``, ``bver``) apply to the record that carries them
  and to every later record, until replaced;
- the name is ``bn + n``; the metric is its last segment after ``/`` or ``:`` (so
  ``urn:dev:ow:10e2073a01080063:`` + ``pm2.5`` is metric ``pm25``), normalised through the
  metric table; the unit is ``u`` or else ``bu``, converted to the metric's canonical unit;
  no unit means the canonical unit;
- the time is ``bt + t`` in **seconds**: below 2^28 it is relative to now (``t: -60`` is a
  minute ago, no time at all is now), otherwise epoch seconds; a time that only makes sense
  as milliseconds is refused as ``timestamp_in_future`` with a detail that says so;
- the value is ``bv + v``; a record must carry exactly one value field, and only numeric
  ``v`` is taken (pilotlab's metrics are numbers): ``vs``, ``vb``, ``vd``, sums (``s``,
  ``bs``), a ``bver`` above 10 and must-understand labels (ending in ``_``) are refused with
  ``unsupported_senml``;
- records with the same resolved time form one reading; the same metric twice at one time
  is a ``duplicate``. SenML has no sequence number: its readings carry ``seq`` 0 and the
  ingest's per-device ``seq`` check does not apply to them (storage's natural key does).
"""

from __future__ import annotations

import math
import re

from pilotlab.contracts import Reading, Reason
from pilotlab.metrics import METRICS, canonical_metric, convert

# every label RFC 8428 defines (JSON representation)
SENML_LABELS = frozenset({"bn", "bt", "bu", "bv", "bs", "bver", "n", "u", "v", "vs", "vb", "vd", "s", "t", "ut"})
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9:./_-]*")  # RFC 8428 section 4.5.1, with fullmatch
_RELATIVE_BELOW_S = 2**28  # RFC 8428 section 4.5.3: smaller times are relative to now
_MS_NOT_S_ABOVE_S = 100_000_000_000  # epoch seconds above this are after the year 5000
_SUPPORTED_VERSION = 10
_MAX_NAME = 256


def is_senml(doc: object) -> bool:
    """A JSON array whose first element is an object with a SenML label and no ``metrics``.
    The native format's keys (``seq``, ``ts``, ``metrics``) and SenML's labels are disjoint,
    so the two formats cannot be confused."""
    return isinstance(doc, list) and bool(doc) and _looks_like_record(doc[0])


def looks_like_bare_record(doc: object) -> bool:
    """One SenML record sent without its array (a common mistake)."""
    return _looks_like_record(doc)


def _looks_like_record(d: object) -> bool:
    return isinstance(d, dict) and "metrics" not in d and not SENML_LABELS.isdisjoint(d)


def _num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class _Refused(Exception):  # internal control flow, never escapes this module
    def __init__(self, reason: Reason, detail: str) -> None:
        self.reason, self.detail = reason, detail


def _finite(label: str, v: object) -> float:
    if not _num(v):
        raise _Refused(Reason.WRONG_TYPE, f"{label} must be a number")
    try:
        f = float(v)
    except OverflowError:  # an integer of thousands of digits
        raise _Refused(Reason.NON_FINITE, f"{label} is not a finite number") from None
    if not math.isfinite(f):
        raise _Refused(Reason.NON_FINITE, f"{label} is not a finite number")
    return f


class _Base:
    __slots__ = ("bn", "bt", "bu", "bv")

    def __init__(self) -> None:
        self.bn, self.bt, self.bu, self.bv = "", 0.0, None, 0.0

    def update(self, rec: dict) -> None:
        """Apply the record's base fields (validated first: nothing changes on a refusal)."""
        bn, bt, bu, bv = self.bn, self.bt, self.bu, self.bv
        if "bver" in rec:
            ver = rec["bver"]
            if not isinstance(ver, int) or isinstance(ver, bool) or ver < 1:
                raise _Refused(Reason.WRONG_TYPE, "bver must be a positive integer")
            if ver > _SUPPORTED_VERSION:  # decode_pack refuses the whole pack first
                raise _Refused(Reason.UNSUPPORTED_SENML, f"SenML version {ver}; pilotlab reads up to 10")
        if "bn" in rec:
            if not isinstance(rec["bn"], str):
                raise _Refused(Reason.WRONG_TYPE, "bn must be a string")
            bn = rec["bn"]
        if "bt" in rec:
            bt = _finite("bt", rec["bt"])
        if "bu" in rec:
            if not isinstance(rec["bu"], str):
                raise _Refused(Reason.WRONG_TYPE, "bu must be a string")
            bu = rec["bu"]
        if "bv" in rec:
            bv = _finite("bv", rec["bv"])
        if "bs" in rec:
            raise _Refused(Reason.UNSUPPORTED_SENML, "base sum (bs) is not supported; send v")
        self.bn, self.bt, self.bu, self.bv = bn, bt, bu, bv


def _time_ms(base: _Base, rec: dict, now_ms: int, max_age_ms: int, max_future_ms: int) -> int:
    t = _finite("t", rec["t"]) if "t" in rec else 0.0
    resolved = base.bt + t
    if not math.isfinite(resolved):
        raise _Refused(Reason.NON_FINITE, "bt + t is not a finite number")
    if abs(resolved) < _RELATIVE_BELOW_S:
        ts_ms = now_ms + round(resolved * 1000)
    else:
        if resolved < 0:
            raise _Refused(Reason.TIMESTAMP_TOO_OLD, f"time {resolved:.0f} is before 1970")
        if resolved > _MS_NOT_S_ABOVE_S:
            raise _Refused(
                Reason.TIMESTAMP_IN_FUTURE,
                f"time {resolved:.0f} looks like epoch milliseconds; SenML times are seconds",
            )
        ts_ms = round(resolved * 1000)
    if ts_ms > now_ms + max_future_ms:
        raise _Refused(
            Reason.TIMESTAMP_IN_FUTURE,
            f"time is {(ts_ms - now_ms) / 1000:.0f} s ahead of the server clock "
            f"(allowed {max_future_ms / 1000:.0f} s); check the device clock",
        )
    if ts_ms < now_ms - max_age_ms:
        raise _Refused(
            Reason.TIMESTAMP_TOO_OLD,
            f"time is {(now_ms - ts_ms) / 86_400_000:.1f} days old (allowed {max_age_ms / 86_400_000:.1f} days)",
        )
    return ts_ms


def _record(base: _Base, rec: dict, now_ms: int, max_age_ms: int, max_future_ms: int) -> tuple[int, str, float]:
    """One record → (ts_ms, metric, canonical value)."""
    base.update(rec)
    if "s" in rec:
        raise _Refused(Reason.UNSUPPORTED_SENML, "sum (s) is not supported; send v")
    values = [k for k in ("v", "vs", "vb", "vd") if k in rec]
    if not values:
        raise _Refused(Reason.MISSING_FIELD, "a record needs a value: v")
    if len(values) > 1:
        raise _Refused(Reason.UNSUPPORTED_SENML, f"a record carries one value field, not {', '.join(values)}")
    if values[0] != "v":
        raise _Refused(Reason.UNSUPPORTED_SENML, f"{values[0]} values are not supported: metrics are numbers (v)")
    n = rec.get("n", "")
    if not isinstance(n, str):
        raise _Refused(Reason.WRONG_TYPE, "n must be a string")
    name = base.bn + n
    if not name:
        raise _Refused(Reason.MISSING_FIELD, "a record needs a name: bn + n")
    if len(name) > _MAX_NAME or not _NAME.fullmatch(name):
        raise _Refused(Reason.WRONG_TYPE, f"name {name[:64]!r} is not a valid SenML name")
    segment = re.split(r"[/:]", name)[-1]
    metric_name = canonical_metric(segment) if segment else None
    if metric_name is None:
        raise _Refused(
            Reason.UNKNOWN_METRIC, f"metric {segment[:40]!r} (from {name[:64]!r}) is not in the metric table"
        )
    metric = METRICS[metric_name]
    ts_ms = _time_ms(base, rec, now_ms, max_age_ms, max_future_ms)
    value = base.bv + _finite(f"v of {metric_name}", rec["v"])
    if not math.isfinite(value):
        raise _Refused(Reason.NON_FINITE, f"bv + v of {metric_name} is not finite")
    unit = rec.get("u", base.bu)
    if unit is not None:
        if not isinstance(unit, str):
            raise _Refused(Reason.WRONG_TYPE, "u must be a string")
        converted = convert(metric, unit, value)
        if converted is None:
            raise _Refused(
                Reason.UNKNOWN_UNIT,
                f"unit {unit[:32]!r} cannot be converted to {metric.unit} for {metric_name}",
            )
        value = converted
    if not metric.low <= value <= metric.high:
        raise _Refused(
            Reason.VALUE_OUT_OF_RANGE,
            f"{metric_name}={value:g} outside [{metric.low:g}, {metric.high:g}] {metric.unit}",
        )
    return ts_ms, metric_name, value


def decode_pack(
    doc: list, now_ms: int, max_age_ms: int, max_future_ms: int
) -> tuple[list[Reading], list[tuple[Reason, str, int]]]:
    """A SenML pack → readings (one per resolved time) and (reason, detail, record index)."""
    if whole := _pack_refusal(doc):  # RFC 8428 4.4: such a pack must not be processed at all
        return [], [(Reason.UNSUPPORTED_SENML, whole, i) for i in range(len(doc))]
    base = _Base()
    by_time: dict[int, dict[str, float]] = {}
    errors: list[tuple[Reason, str, int]] = []
    broken_base: int | None = None
    for i, rec in enumerate(doc):
        if not isinstance(rec, dict):
            errors.append((Reason.NOT_AN_OBJECT, "each SenML record is a JSON object", i))
            continue
        if broken_base is not None:
            errors.append(
                (Reason.WRONG_TYPE, f"a base field of record {broken_base} is invalid; later records are unresolved", i)
            )
            continue
        try:
            ts_ms, metric, value = _record(base, rec, now_ms, max_age_ms, max_future_ms)
        except _Refused as r:
            if _base_broken(rec):
                broken_base = i
            errors.append((r.reason, r.detail, i))
            continue
        metrics = by_time.setdefault(ts_ms, {})
        if metric in metrics:
            errors.append((Reason.DUPLICATE, f"{metric} at the same time appears twice in the pack", i))
            continue
        metrics[metric] = value
    readings = [Reading(seq=0, ts_ms=ts, metrics=m) for ts, m in by_time.items()]
    return readings, errors


def _base_broken(rec: dict) -> bool:
    """Would these base fields be refused? (then later records cannot be resolved)."""
    try:
        _Base().update({k: v for k, v in rec.items() if k in ("bn", "bt", "bu", "bv", "bver")})
    except _Refused:
        return True
    return False


def _pack_refusal(doc: list) -> str | None:
    """Why the whole pack is refused: a must-understand label or a newer SenML version."""
    for i, rec in enumerate(doc):
        if not isinstance(rec, dict):
            continue
        if must := sorted(k for k in rec if k.endswith("_")):
            return f"record {i} carries must-understand label {must[0][:40]!r}; the pack is not processed"
        ver = rec.get("bver")
        if _num(ver) and ver > _SUPPORTED_VERSION:
            return f"record {i} is SenML version {ver}; pilotlab reads up to {_SUPPORTED_VERSION}"
    return None
