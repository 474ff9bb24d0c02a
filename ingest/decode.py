"""Pure parsing at the edge: MQTT topic and payload in, readings and reason-coded rejections out.

Nothing here does I/O, logs or raises on bad input: every input yields a ``Decoded`` whose
``readings`` are valid and whose ``errors`` say, item by item, why the rest was refused.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime

import orjson

from ingest.senml import decode_pack, is_senml, looks_like_bare_record
from pilotlab.contracts import Limits, Reading, Reason, to_ms
from pilotlab.metrics import METRICS, canonical_metric

_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")  # used with fullmatch
# epoch milliseconds below this are before 1973-03: almost surely epoch *seconds*
_SECONDS_NOT_MS_BELOW = 100_000_000_000
_DEFAULT_LIMITS = Limits()
_SEQ_END = 2**63
_FLOAT_SAFE_INT = 2**63  # float() of a smaller integer never overflows
# canonical name → (low, high) of every metric whose range is finite: within it a value is
# finite too, so the fast path needs no isfinite call (a metric with an open range is left
# to decode_item)
_FINITE_BOUNDS = {
    name: (m.low, m.high) for name, m in METRICS.items() if math.isfinite(m.low) and math.isfinite(m.high)
}


@dataclass(frozen=True, slots=True)
class ItemError:
    reason: Reason
    detail: str
    item_index: int | None = None


@dataclass(slots=True)
class Decoded:
    readings: list[Reading] = field(default_factory=list)
    errors: list[ItemError] = field(default_factory=list)
    senml: bool = False  # SenML readings carry no device seq (seq 0)
    indexes: list[int | None] = field(default_factory=list)  # batch item of each native reading


@dataclass(frozen=True, slots=True)
class TopicAddress:
    experiment_id: str
    device_id: str


# the longest topic that can be valid: pilots/ + 63 characters + / + 63 characters + /telemetry
_LONGEST_VALID_TOPIC = len("pilots///telemetry") + 2 * 63


def parse_topic(topic: str) -> TopicAddress | ItemError:
    """``pilots/{experiment_id}/{device_id}/telemetry`` → its address, or why not (both
    immutable, so the same object may be handed out again).

    A device keeps its topic: it is split and matched once, then found in a bounded cache.
    Only topics short enough to be valid are cached (at most 65,536 × 144 characters), so
    a sender of long, ever-different topics cannot grow it beyond that."""
    if len(topic) > _LONGEST_VALID_TOPIC:
        return _parse_topic(topic)
    return _parse_topic_cached(topic)


def _parse_topic(topic: str) -> TopicAddress | ItemError:
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] != "pilots" or parts[3] != "telemetry":
        return ItemError(Reason.BAD_TOPIC, "publish to pilots/{experiment_id}/{device_id}/telemetry")
    for what, value in (("experiment id", parts[1]), ("device id", parts[2])):
        if not _ID.fullmatch(value):
            return ItemError(Reason.BAD_TOPIC, f"{what} {value[:64]!r} must match [a-z0-9][a-z0-9_-]{{0,62}}")
    return TopicAddress(parts[1], parts[2])


_parse_topic_cached = functools.lru_cache(maxsize=65_536)(_parse_topic)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _parse_ts(raw: object, now_ms: int, limits: Limits) -> int | ItemError:
    if isinstance(raw, str):
        if not raw.isprintable():  # fromisoformat would ignore what follows a NUL
            return ItemError(Reason.WRONG_TYPE, "ts contains control characters")
        try:
            dt = datetime.fromisoformat(raw)
        except ValueError:
            return ItemError(Reason.WRONG_TYPE, f"ts {raw[:40]!r} is not an ISO-8601 time")
        if dt.tzinfo is None:
            return ItemError(Reason.WRONG_TYPE, "ts needs a UTC offset, e.g. 2026-03-01T08:00:00Z")
        ts_ms = to_ms(dt)
    elif _is_number(raw):
        if not math.isfinite(raw):
            return ItemError(Reason.NON_FINITE, "ts is not a finite number")
        if isinstance(raw, float) and not raw.is_integer():
            return ItemError(Reason.WRONG_TYPE, "ts in epoch milliseconds must be a whole number")
        ts_ms = int(raw)
        if 0 < ts_ms < _SECONDS_NOT_MS_BELOW:
            return ItemError(
                Reason.TIMESTAMP_TOO_OLD, f"ts {ts_ms} looks like epoch seconds; send milliseconds"
            )
    else:
        return ItemError(Reason.WRONG_TYPE, "ts must be an ISO-8601 string or epoch milliseconds")
    verdict = limits.ts_verdict(ts_ms, now_ms)
    if verdict is Reason.TIMESTAMP_IN_FUTURE:
        return ItemError(
            Reason.TIMESTAMP_IN_FUTURE,
            f"ts is {(ts_ms - now_ms) / 1000:.0f} s ahead of the server clock "
            f"(allowed {limits.max_future_ms / 1000:.0f} s); check the device clock",
        )
    if verdict is Reason.TIMESTAMP_TOO_OLD:
        return ItemError(
            Reason.TIMESTAMP_TOO_OLD,
            f"ts is {(now_ms - ts_ms) / 86_400_000:.1f} days old "
            f"(allowed {limits.max_age_ms / 86_400_000:.1f} days)",
        )
    return ts_ms


def decode_item(item: object, index: int | None, now_ms: int, limits: Limits) -> Reading | ItemError:
    """One JSON object ``{"seq": int, "ts": ..., "metrics": {name: number}}``."""
    if not isinstance(item, dict):
        return ItemError(Reason.NOT_AN_OBJECT, "each reading is a JSON object", index)
    for name in ("seq", "ts", "metrics"):
        if name not in item:
            return ItemError(Reason.MISSING_FIELD, f"field {name!r} is required", index)
    seq = item["seq"]
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0 or seq >= 2**63:
        return ItemError(Reason.WRONG_TYPE, "seq must be a non-negative integer below 2^63", index)
    ts = _parse_ts(item["ts"], now_ms, limits)
    if isinstance(ts, ItemError):
        return ItemError(ts.reason, ts.detail, index)
    metrics = item["metrics"]
    if not isinstance(metrics, dict):
        return ItemError(Reason.WRONG_TYPE, "metrics must be an object of name: number", index)
    if not metrics:
        return ItemError(Reason.MISSING_FIELD, "metrics is empty", index)
    clean: dict[str, float] = {}
    for raw_name, raw_value in metrics.items():
        name = canonical_metric(raw_name)
        if name is None:
            return ItemError(Reason.UNKNOWN_METRIC, f"metric {raw_name[:40]!r} is not in the metric table", index)
        if name in clean:
            return ItemError(Reason.WRONG_TYPE, f"metric {name!r} is given twice (as {raw_name[:40]!r})", index)
        metric = METRICS[name]
        if not _is_number(raw_value):
            return ItemError(Reason.WRONG_TYPE, f"metric {raw_name[:40]!r} must be a number", index)
        try:
            value = float(raw_value)
        except OverflowError:  # an integer beyond the double range
            value = math.inf
        if not math.isfinite(value):
            return ItemError(Reason.NON_FINITE, f"metric {name!r} is not finite", index)
        if not metric.low <= value <= metric.high:
            return ItemError(
                Reason.VALUE_OUT_OF_RANGE,
                f"{name}={value:g} outside [{metric.low:g}, {metric.high:g}] {metric.unit}",
                index,
            )
        clean[name] = value
    return Reading(seq=seq, ts_ms=ts, metrics=clean)


def plain_reading(item: object, now_ms: int, limits: Limits) -> Reading | None:
    """The common well-formed item in one pass, for speed: an integer ``seq``, an integer
    epoch-ms ``ts`` inside the window, canonical metric names with finite numbers in range.
    Anything else gives None and :func:`decode_item` judges it (refusals and their wording
    live there only). For every item it accepts, the Reading equals ``decode_item``'s
    (tests/unit/test_decode_fast.py). It halves decoding's CPU on typical batches: no
    per-field error plumbing, no alias lookup, no isinstance chains."""
    if type(item) is not dict:
        return None
    seq, ts, metrics = item.get("seq"), item.get("ts"), item.get("metrics")
    if type(seq) is not int or seq < 0 or seq >= _SEQ_END:
        return None
    if type(ts) is not int or ts < _SECONDS_NOT_MS_BELOW or limits.ts_verdict(ts, now_ms) is not None:
        return None
    if type(metrics) is not dict or not metrics:
        return None
    clean: dict[str, float] = {}
    for name, raw in metrics.items():
        bounds = _FINITE_BOUNDS.get(name)
        if bounds is None:
            return None
        kind = type(raw)
        if kind is float:
            value = raw
        elif kind is int and -_FLOAT_SAFE_INT < raw < _FLOAT_SAFE_INT:
            value = float(raw)
        else:
            return None
        if not bounds[0] <= value <= bounds[1]:  # finite bounds: NaN and ±inf fail here too
            return None
        clean[name] = value
    return Reading(seq, ts, clean)


def decode(payload: bytes, now_ms: int, limits: Limits = _DEFAULT_LIMITS) -> Decoded:
    """A payload (one object, or a JSON array of objects) → valid readings and item errors."""
    out = Decoded()
    if len(payload) > limits.max_payload_bytes:
        out.errors.append(
            ItemError(
                Reason.PAYLOAD_TOO_LARGE,
                f"{len(payload)} bytes; the limit is {limits.max_payload_bytes}",
            )
        )
        return out
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        doc = _with_non_finite_numbers(payload)
        if doc is _NOT_JSON:
            out.errors.append(ItemError(Reason.MALFORMED_JSON, str(exc)[:200]))
            return out
    if is_senml(doc):
        out.senml = True
        if len(doc) > limits.max_batch:
            out.errors.append(
                ItemError(Reason.BATCH_TOO_LARGE, f"{len(doc)} SenML records; the limit is {limits.max_batch}")
            )
            return out
        readings, errors = decode_pack(doc, now_ms, limits.max_age_ms, limits.max_future_ms)
        out.readings.extend(readings)
        out.errors.extend(ItemError(reason, detail, i) for reason, detail, i in errors)
        return out
    if looks_like_bare_record(doc):
        out.errors.append(
            ItemError(Reason.UNSUPPORTED_SENML, "a SenML pack is a JSON array of records: send [{...}]")
        )
        return out
    if isinstance(doc, list):
        if not doc:
            out.errors.append(ItemError(Reason.MISSING_FIELD, "empty batch"))
            return out
        if len(doc) > limits.max_batch:
            out.errors.append(
                ItemError(Reason.BATCH_TOO_LARGE, f"{len(doc)} items; the limit is {limits.max_batch}")
            )
            return out
        items: list[tuple[int | None, object]] = list(enumerate(doc))
    else:
        items = [(None, doc)]
    for index, item in items:
        result = plain_reading(item, now_ms, limits)
        if result is None:
            result = decode_item(item, index, now_ms, limits)
        if isinstance(result, ItemError):
            out.errors.append(result)
        else:
            out.readings.append(result)
            out.indexes.append(index)
    return out


_NOT_JSON = object()


def _with_non_finite_numbers(payload: bytes) -> object:
    """orjson refuses ``NaN``, ``Infinity``, ``1e400`` and integers beyond 64 bits. Such a
    document is still JSON-shaped and deserves ``non_finite``, not ``malformed_json``: parse it
    again with the standard library, turning every such number into ±inf. Anything else
    orjson refused (bad UTF-8, lone surrogates, trailing data...) stays malformed."""
    found: list[bool] = []

    def constant(name: str) -> float:
        found.append(True)
        return math.nan if name == "NaN" else (math.inf if name == "Infinity" else -math.inf)

    def number(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            found.append(True)
        return value

    def integer(text: str) -> int | float:
        if len(text.lstrip("-")) > 19:  # beyond 64 bits (and Python's int-from-str limit)
            found.append(True)
            return -math.inf if text.startswith("-") else math.inf
        return int(text)

    try:
        text = payload.decode("utf-8")
        doc = json.loads(text, parse_constant=constant, parse_float=number, parse_int=integer)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return _NOT_JSON
    if not found or _has_lone_surrogate(doc):
        return _NOT_JSON
    return doc


def _has_lone_surrogate(doc: object, depth: int = 0) -> bool:
    if depth > 64:
        return True  # orjson refuses deeper documents: keep them malformed
    if isinstance(doc, str):
        return any("\ud800" <= ch <= "\udfff" for ch in doc)
    if isinstance(doc, list):
        return any(_has_lone_surrogate(v, depth + 1) for v in doc)
    if isinstance(doc, dict):
        return any(_has_lone_surrogate(k, depth + 1) or _has_lone_surrogate(v, depth + 1) for k, v in doc.items())
    return False
