"""The edge parser: ``parse_topic`` and ``decode``/``decode_item`` on good and hostile input.

Everything here is pure: a fixed clock, fixed ``Limits``, bytes in, readings and reason-coded
errors out. ``decode`` must never raise, whatever the bytes.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.decode import Decoded, ItemError, TopicAddress, decode, decode_item, parse_topic
from pilotlab.contracts import Limits, Reading, Reason, to_ms
from pilotlab.metrics import METRICS

NOW = datetime(2026, 3, 15, 12, 0, 0, tzinfo=UTC)
NOW_MS = 1_773_576_000_000
DAY_MS = 86_400_000
LIMITS = Limits(max_payload_bytes=64 * 1024, max_batch=50, max_age_ms=7 * DAY_MS, max_future_ms=300_000)
TS = NOW_MS - 60_000  # a good timestamp: one minute ago

_DROP = object()


def item(**fields: object) -> dict:
    """A valid reading, with some fields replaced (or dropped with ``_DROP``)."""
    out: dict = {"seq": 1, "ts": TS, "metrics": {"no2": 40.0, "pm25": 12}}
    for name, value in fields.items():
        if value is _DROP:
            out.pop(name)
        else:
            out[name] = value
    return out


def js(doc: object) -> bytes:
    return orjson.dumps(doc)


def raw_item(seq: str = "1", ts: str = str(TS), metrics: str = '{"no2": 40.0}') -> bytes:
    """A reading spelled out as raw JSON text, for literals orjson would never emit."""
    return f'{{"seq": {seq}, "ts": {ts}, "metrics": {metrics}}}'.encode()


GOOD = js(item())
HUGE_DIGITS = "9" * 3000
ISO_NOW = "2026-03-15T12:00:00Z"

# --- the bad-input catalogue ----------------------------------------------------------------

BAD_INPUTS: list = [
    # malformed and truncated JSON
    pytest.param(b'{"seq": 1, "ts": }', Reason.MALFORMED_JSON, id="malformed-missing-value"),
    pytest.param(GOOD[:-7], Reason.MALFORMED_JSON, id="truncated-object"),
    pytest.param(js([item(), item(seq=2)])[:-1], Reason.MALFORMED_JSON, id="truncated-array"),
    pytest.param(b"", Reason.MALFORMED_JSON, id="empty-payload"),
    pytest.param(b"  \n\t ", Reason.MALFORMED_JSON, id="whitespace-only"),
    pytest.param(b"{'seq': 1}", Reason.MALFORMED_JSON, id="single-quotes"),
    pytest.param(b'{"seq": 1,}', Reason.MALFORMED_JSON, id="trailing-comma"),
    pytest.param(GOOD + GOOD, Reason.MALFORMED_JSON, id="two-documents"),
    pytest.param(b"\xef\xbb\xbf" + GOOD, Reason.MALFORMED_JSON, id="utf8-bom"),
    # NUL bytes and bad text
    pytest.param(GOOD[:1] + b"\x00" + GOOD[1:], Reason.MALFORMED_JSON, id="nul-between-tokens"),
    pytest.param(GOOD + b"\x00", Reason.MALFORMED_JSON, id="nul-trailing"),
    pytest.param(b"\x00" * 16, Reason.MALFORMED_JSON, id="nul-only"),
    pytest.param(GOOD.replace(b'"seq"', b'"se\x00q"'), Reason.MALFORMED_JSON, id="raw-nul-in-key"),
    pytest.param(raw_item(metrics='{"\\ud800": 1}'), Reason.MALFORMED_JSON, id="lone-high-surrogate"),
    pytest.param(raw_item(metrics='{"\\udc00": 1}'), Reason.MALFORMED_JSON, id="lone-low-surrogate"),
    pytest.param(raw_item(ts='"2026-03-15T11:00:00\\ud800Z"'), Reason.MALFORMED_JSON, id="surrogate-in-ts"),
    pytest.param(GOOD.replace(b'"no2"', b'"no2\xff\xfe"'), Reason.MALFORMED_JSON, id="invalid-utf8-bytes"),
    pytest.param(GOOD.replace(b'"no2"', b'"\xc0\xaf"'), Reason.MALFORMED_JSON, id="overlong-utf8"),
    pytest.param(b'"\xed\xa0\x80"', Reason.MALFORMED_JSON, id="utf8-encoded-surrogate"),
    pytest.param(
        raw_item(metrics='{"no2\\u0000": 1}'), Reason.UNKNOWN_METRIC, id="escaped-nul-in-metric-name"
    ),
    # nesting
    pytest.param(b"[" * 10_000 + b"]" * 10_000, Reason.MALFORMED_JSON, id="nested-arrays-10000"),
    pytest.param(b'{"a":' * 10_000 + b"1" + b"}" * 10_000, Reason.MALFORMED_JSON, id="nested-objects-10000"),
    pytest.param(
        raw_item(metrics='{"no2": ' + "[" * 10_000 + "]" * 10_000 + "}"),
        Reason.MALFORMED_JSON,
        id="nested-metric-value-10000",
    ),
    pytest.param(
        raw_item(metrics='{"no2": ' + "[" * 100 + "]" * 100 + "}"),
        Reason.WRONG_TYPE,
        id="nested-metric-value-100",
    ),
    pytest.param(js([[item()]]), Reason.NOT_AN_OBJECT, id="array-in-array"),
    # duplicate keys: orjson keeps the last one
    pytest.param(
        b'{"seq": 1, "seq": "one", "ts": %d, "metrics": {"no2": 4}}' % TS,
        Reason.WRONG_TYPE,
        id="duplicate-seq-last-bad",
    ),
    pytest.param(
        raw_item(metrics='{"no2": 40, "no2": 5000}'),
        Reason.VALUE_OUT_OF_RANGE,
        id="duplicate-metric-last-bad",
    ),
    # integers of thousands of digits: beyond the double range, so not finite numbers
    pytest.param(raw_item(seq=HUGE_DIGITS), Reason.WRONG_TYPE, id="seq-3000-digits"),
    pytest.param(raw_item(ts=HUGE_DIGITS), Reason.NON_FINITE, id="ts-3000-digits"),
    pytest.param(raw_item(ts="-" + HUGE_DIGITS), Reason.NON_FINITE, id="ts-negative-3000-digits"),
    pytest.param(raw_item(metrics=f'{{"no2": {HUGE_DIGITS}}}'), Reason.NON_FINITE, id="metric-3000-digits"),
    pytest.param(raw_item(metrics=f'{{"no2": {"9" * 5000}}}'), Reason.NON_FINITE, id="metric-5000-digits"),
    # big but parseable integers
    pytest.param(raw_item(seq=str(2**63)), Reason.WRONG_TYPE, id="seq-2^63"),
    pytest.param(raw_item(seq=str(2**64 - 1)), Reason.WRONG_TYPE, id="seq-u64-max"),
    pytest.param(raw_item(seq=str(2**64)), Reason.WRONG_TYPE, id="seq-2^64-becomes-float"),
    pytest.param(raw_item(seq="1" + "0" * 30), Reason.WRONG_TYPE, id="seq-31-digits"),
    pytest.param(raw_item(ts=str(2**64 - 1)), Reason.TIMESTAMP_IN_FUTURE, id="ts-u64-max"),
    pytest.param(raw_item(ts="1" + "0" * 30), Reason.TIMESTAMP_IN_FUTURE, id="ts-31-digits"),
    pytest.param(raw_item(ts="-" + "1" + "0" * 30), Reason.TIMESTAMP_TOO_OLD, id="ts-negative-31-digits"),
    pytest.param(raw_item(metrics=f'{{"no2": {10**19}}}'), Reason.VALUE_OUT_OF_RANGE, id="metric-20-digits"),
    # non-finite literals (not strict JSON, but a sensor's NaN deserves its own code)
    pytest.param(raw_item(metrics='{"no2": NaN}'), Reason.NON_FINITE, id="metric-NaN"),
    pytest.param(raw_item(metrics='{"no2": Infinity}'), Reason.NON_FINITE, id="metric-Infinity"),
    pytest.param(raw_item(metrics='{"no2": -Infinity}'), Reason.NON_FINITE, id="metric-minus-Infinity"),
    pytest.param(raw_item(metrics='{"no2": 1e400}'), Reason.NON_FINITE, id="metric-1e400"),
    pytest.param(raw_item(metrics='{"no2": -1e400}'), Reason.NON_FINITE, id="metric-minus-1e400"),
    pytest.param(raw_item(ts="NaN"), Reason.NON_FINITE, id="ts-NaN"),
    pytest.param(raw_item(ts="1e400"), Reason.NON_FINITE, id="ts-1e400"),
    pytest.param(raw_item(seq="Infinity"), Reason.WRONG_TYPE, id="seq-Infinity"),
    pytest.param(b"[" + raw_item(metrics='{"no2": NaN}') + b"]", Reason.NON_FINITE, id="nan-in-batch"),
    pytest.param(raw_item(metrics='{"no2": nan}'), Reason.MALFORMED_JSON, id="lower-case-nan-is-not-json"),
    pytest.param(
        raw_item(metrics='{"no2": NaN, "\\ud800": 1}'), Reason.MALFORMED_JSON, id="nan-and-lone-surrogate"
    ),
    # wrong types
    pytest.param(js(item(seq=True)), Reason.WRONG_TYPE, id="seq-bool"),
    pytest.param(js(item(ts=True)), Reason.WRONG_TYPE, id="ts-bool"),
    pytest.param(js(item(metrics={"no2": True})), Reason.WRONG_TYPE, id="metric-bool"),
    pytest.param(js(item(metrics={"no2": False})), Reason.WRONG_TYPE, id="metric-false"),
    pytest.param(js(item(seq="1")), Reason.WRONG_TYPE, id="seq-string"),
    pytest.param(js(item(seq=1.0)), Reason.WRONG_TYPE, id="seq-float"),
    pytest.param(js(item(seq=None)), Reason.WRONG_TYPE, id="seq-null"),
    pytest.param(js(item(seq=-1)), Reason.WRONG_TYPE, id="seq-negative"),
    pytest.param(js(item(ts=None)), Reason.WRONG_TYPE, id="ts-null"),
    pytest.param(js(item(ts=[TS])), Reason.WRONG_TYPE, id="ts-list"),
    pytest.param(js(item(ts={"ms": TS})), Reason.WRONG_TYPE, id="ts-object"),
    pytest.param(js(item(metrics={"no2": "40"})), Reason.WRONG_TYPE, id="metric-string"),
    pytest.param(js(item(metrics={"no2": None})), Reason.WRONG_TYPE, id="metric-null"),
    pytest.param(js(item(metrics=[["no2", 40]])), Reason.WRONG_TYPE, id="metrics-list"),
    pytest.param(js(item(metrics=40)), Reason.WRONG_TYPE, id="metrics-number"),
    pytest.param(js(item(metrics=None)), Reason.WRONG_TYPE, id="metrics-null"),
    # missing and empty
    pytest.param(js(item(seq=_DROP)), Reason.MISSING_FIELD, id="missing-seq"),
    pytest.param(js(item(ts=_DROP)), Reason.MISSING_FIELD, id="missing-ts"),
    pytest.param(js(item(metrics=_DROP)), Reason.MISSING_FIELD, id="missing-metrics"),
    pytest.param(b"{}", Reason.MISSING_FIELD, id="empty-object"),
    pytest.param(js(item(metrics={})), Reason.MISSING_FIELD, id="empty-metrics"),
    pytest.param(b"[]", Reason.MISSING_FIELD, id="empty-array"),
    # metrics against the metric table
    pytest.param(js(item(metrics={"co2": 400.0})), Reason.UNKNOWN_METRIC, id="unknown-metric"),
    pytest.param(js(item(metrics={"co2_ppm": 400.0})), Reason.UNKNOWN_METRIC, id="unknown-metric-with-unit"),
    pytest.param(js(item(metrics={"pm2": 4.0})), Reason.UNKNOWN_METRIC, id="ambiguous-pm2-is-not-guessed"),
    pytest.param(js(item(metrics={"pm25": 4.0, "PM2.5": 5.0})), Reason.WRONG_TYPE, id="metric-twice-by-alias"),
    pytest.param(
        js(item(metrics={"no2": 40.0, "co2": 1.0})), Reason.UNKNOWN_METRIC, id="good-and-unknown-metric"
    ),
    pytest.param(js(item(metrics={"": 1.0})), Reason.UNKNOWN_METRIC, id="empty-metric-name"),
    pytest.param(js(item(metrics={"occupancy": 1.5})), Reason.VALUE_OUT_OF_RANGE, id="occupancy-above-1"),
    pytest.param(js(item(metrics={"no2": -0.1})), Reason.VALUE_OUT_OF_RANGE, id="no2-negative"),
    pytest.param(js(item(metrics={"temperature": -61})), Reason.VALUE_OUT_OF_RANGE, id="temperature-below"),
    pytest.param(js(item(metrics={"lat": 90.0001})), Reason.VALUE_OUT_OF_RANGE, id="lat-above"),
    pytest.param(js(item(metrics={"pm25": 1e308})), Reason.VALUE_OUT_OF_RANGE, id="pm25-1e308"),
    # timestamps
    pytest.param(js(item(ts=NOW_MS // 1000)), Reason.TIMESTAMP_TOO_OLD, id="ts-epoch-seconds"),
    pytest.param(js(item(ts=NOW_MS / 1000)), Reason.TIMESTAMP_TOO_OLD, id="ts-epoch-seconds-float"),
    pytest.param(js(item(ts=0)), Reason.TIMESTAMP_TOO_OLD, id="ts-zero"),
    pytest.param(js(item(ts=-1)), Reason.TIMESTAMP_TOO_OLD, id="ts-negative"),
    pytest.param(js(item(ts=NOW_MS + LIMITS.max_future_ms + 1)), Reason.TIMESTAMP_IN_FUTURE, id="ts-future"),
    pytest.param(js(item(ts=NOW_MS * 1000)), Reason.TIMESTAMP_IN_FUTURE, id="ts-epoch-microseconds"),
    pytest.param(js(item(ts=NOW_MS - LIMITS.max_age_ms - 1)), Reason.TIMESTAMP_TOO_OLD, id="ts-too-old"),
    pytest.param(js(item(ts="2026-03-15T11:00:00")), Reason.WRONG_TYPE, id="ts-iso-naive"),
    pytest.param(js(item(ts="2026-03-15")), Reason.WRONG_TYPE, id="ts-iso-date-only"),
    pytest.param(js(item(ts="yesterday at noon")), Reason.WRONG_TYPE, id="ts-iso-garbage"),
    pytest.param(js(item(ts="")), Reason.WRONG_TYPE, id="ts-empty-string"),
    pytest.param(js(item(ts="2026-02-30T00:00:00Z")), Reason.WRONG_TYPE, id="ts-iso-feb-30"),
    pytest.param(js(item(ts="2026-03-15T25:00:00Z")), Reason.WRONG_TYPE, id="ts-iso-hour-25"),
    pytest.param(js(item(ts=str(TS))), Reason.WRONG_TYPE, id="ts-digits-as-string"),
    pytest.param(js(item(ts="2026-03-15T13:00:00Z")), Reason.TIMESTAMP_IN_FUTURE, id="ts-iso-future"),
    pytest.param(js(item(ts="2026-03-01T00:00:00Z")), Reason.TIMESTAMP_TOO_OLD, id="ts-iso-too-old"),
    pytest.param(js(item(ts=TS + 0.5)), Reason.WRONG_TYPE, id="ts-float-with-fraction"),
    # top-level shape and size
    pytest.param(b"42", Reason.NOT_AN_OBJECT, id="top-level-number"),
    pytest.param(b'"hello"', Reason.NOT_AN_OBJECT, id="top-level-string"),
    pytest.param(b"null", Reason.NOT_AN_OBJECT, id="top-level-null"),
    pytest.param(b"true", Reason.NOT_AN_OBJECT, id="top-level-bool"),
    pytest.param(b"[1]", Reason.NOT_AN_OBJECT, id="array-of-number"),
    pytest.param(js([item()] * (LIMITS.max_batch + 1)), Reason.BATCH_TOO_LARGE, id="array-beyond-max-batch"),
    pytest.param(b" " * LIMITS.max_payload_bytes + GOOD, Reason.PAYLOAD_TOO_LARGE, id="payload-too-large"),
    pytest.param(
        b"{" * (LIMITS.max_payload_bytes + 1), Reason.PAYLOAD_TOO_LARGE, id="too-large-and-malformed"
    ),
]


@pytest.mark.parametrize(("payload", "reason"), BAD_INPUTS)
def test_bad_input_is_refused_with_its_reason(payload: bytes, reason: Reason) -> None:
    out = decode(payload, NOW_MS, LIMITS)
    assert out.readings == []
    assert [e.reason for e in out.errors] == [reason], out.errors
    err = out.errors[0]
    assert isinstance(err.reason, Reason)
    assert err.detail
    assert "\x00" not in err.detail  # details are stored in PostgreSQL text columns


def test_catalogue_is_large_enough() -> None:
    assert len(BAD_INPUTS) >= 30
    assert len({p.id for p in BAD_INPUTS}) == len(BAD_INPUTS)


@pytest.mark.parametrize(
    ("payload", "item_index"),
    [
        pytest.param(js(item(seq=-1)), None, id="single-object"),
        pytest.param(js([item(seq=-1)]), 0, id="array-item-0"),
        pytest.param(js([item(), item(), item(seq=-1)]), 2, id="array-item-2"),
        pytest.param(b"[]", None, id="empty-array-is-message-level"),
        pytest.param(b"{", None, id="malformed-is-message-level"),
        pytest.param(js([item()] * (LIMITS.max_batch + 1)), None, id="too-large-batch-is-message-level"),
    ],
)
def test_item_index_of_errors(payload: bytes, item_index: int | None) -> None:
    (err,) = decode(payload, NOW_MS, LIMITS).errors
    assert err.item_index == item_index


def test_deep_nesting_does_not_crash_at_any_depth() -> None:
    for depth in (1, 10, 100, 1000, 1024, 1025, 5000, 50_000):
        payload = b"[" * depth + b"]" * depth
        out = decode(payload, NOW_MS, Limits(max_payload_bytes=1 << 20))
        assert out.readings == []
        assert len(out.errors) == 1
        assert out.errors[0].reason in {Reason.MALFORMED_JSON, Reason.NOT_AN_OBJECT, Reason.MISSING_FIELD}


def test_duplicate_keys_keep_the_last_value() -> None:
    """Documented behaviour: with duplicate keys, orjson keeps the last one, and so does ingest."""
    payload = b'{"seq": "one", "seq": 7, "ts": %d, "metrics": {"no2": 5000, "no2": 41}}' % TS
    out = decode(payload, NOW_MS, LIMITS)
    assert out.errors == []
    assert out.readings == [Reading(seq=7, ts_ms=TS, metrics={"no2": 41.0})]


@pytest.mark.parametrize("name", sorted(METRICS))
def test_metric_range_bounds_are_inclusive(name: str) -> None:
    m = METRICS[name]
    for value in (m.low, m.high, (m.low + m.high) / 2):
        out = decode(js(item(metrics={name: value})), NOW_MS, LIMITS)
        assert out.errors == []
        assert out.readings[0].metrics == {name: float(value)}
    for value in (m.low - 1e-6 * max(1.0, abs(m.low)), m.high + 1e-6 * max(1.0, abs(m.high))):
        out = decode(js(item(metrics={name: value})), NOW_MS, LIMITS)
        assert [e.reason for e in out.errors] == [Reason.VALUE_OUT_OF_RANGE]
        assert name in out.errors[0].detail


def test_timestamp_limits_are_inclusive() -> None:
    for ts in (NOW_MS + LIMITS.max_future_ms, NOW_MS - LIMITS.max_age_ms, NOW_MS):
        out = decode(js(item(ts=ts)), NOW_MS, LIMITS)
        assert out.errors == []
        assert out.readings[0].ts_ms == ts


def test_epoch_seconds_detail_says_seconds() -> None:
    (err,) = decode(js(item(ts=NOW_MS // 1000)), NOW_MS, LIMITS).errors
    assert "seconds" in err.detail


# --- good paths ---------------------------------------------------------------------------


def test_single_object() -> None:
    out = decode(b'{"seq": 3, "ts": %d, "metrics": {"no2": 40.5, "pm25": 12}}' % TS, NOW_MS, LIMITS)
    assert out.errors == []
    assert out.readings == [Reading(seq=3, ts_ms=TS, metrics={"no2": 40.5, "pm25": 12.0})]


def test_array_batch_keeps_order() -> None:
    items = [item(seq=i, ts=TS + i * 1000, metrics={"noise": 50 + i}) for i in range(LIMITS.max_batch)]
    out = decode(js(items), NOW_MS, LIMITS)
    assert out.errors == []
    assert [r.seq for r in out.readings] == list(range(LIMITS.max_batch))
    assert [r.ts_ms for r in out.readings] == [TS + i * 1000 for i in range(LIMITS.max_batch)]
    assert [r.metrics for r in out.readings] == [{"noise": float(50 + i)} for i in range(LIMITS.max_batch)]


@pytest.mark.parametrize(
    ("ts", "expected_ms"),
    [
        pytest.param("2026-03-15T12:00:00Z", NOW_MS, id="Z"),
        pytest.param("2026-03-15T12:00:00+00:00", NOW_MS, id="plus-zero"),
        pytest.param("2026-03-15T12:00:00+01:00", NOW_MS - 3_600_000, id="plus-one-hour"),
        pytest.param("2026-03-15T11:00:00-01:00", NOW_MS, id="minus-one-hour"),
        pytest.param("2026-03-15T11:59:59.123Z", NOW_MS - 877, id="milliseconds"),
        pytest.param("2026-03-15T11:59:59.999999Z", NOW_MS - 1, id="microseconds-floor"),
        pytest.param("2026-03-15T17:30:00+05:30", NOW_MS, id="plus-05-30"),
        pytest.param("2026-03-14T12:00:00Z", NOW_MS - DAY_MS, id="one-day-old"),
    ],
)
def test_iso_timestamps_give_exact_epoch_ms(ts: str, expected_ms: int) -> None:
    out = decode(js(item(ts=ts)), NOW_MS, LIMITS)
    assert out.errors == []
    assert out.readings[0].ts_ms == expected_ms
    assert isinstance(out.readings[0].ts_ms, int)


def test_iso_and_ms_agree_with_to_ms() -> None:
    dt = NOW - timedelta(minutes=7, milliseconds=321)
    a = decode(js(item(ts=dt.isoformat())), NOW_MS, LIMITS).readings[0]
    b = decode(js(item(ts=to_ms(dt))), NOW_MS, LIMITS).readings[0]
    assert a == b


def test_integer_metrics_become_floats() -> None:
    out = decode(
        js(item(metrics={"vehicles_per_hour": 1200, "occupancy": 1, "temperature": -5})), NOW_MS, LIMITS
    )
    (reading,) = out.readings
    assert reading.metrics == {"vehicles_per_hour": 1200.0, "occupancy": 1.0, "temperature": -5.0}
    assert all(type(v) is float for v in reading.metrics.values())


def test_whole_float_ts_is_accepted_as_int() -> None:
    (reading,) = decode(js(item(ts=float(TS))), NOW_MS, LIMITS).readings
    assert reading.ts_ms == TS
    assert type(reading.ts_ms) is int


def test_seq_bounds() -> None:
    for seq in (0, 2**63 - 1):
        (reading,) = decode(js(item(seq=seq)), NOW_MS, LIMITS).readings
        assert reading.seq == seq


def test_array_mixing_good_and_bad_items() -> None:
    items = [
        item(seq=0),
        item(seq=-1),  # 1: wrong type
        item(seq=2),
        "not an object",  # 3
        item(seq=4, metrics={"no2": 1e6}),  # 4: out of range
        item(seq=5, ts=NOW_MS + DAY_MS),  # 5: future
        item(seq=6),
        item(seq=7, metrics={"co2": 1}),  # 7: unknown metric
        item(seq=8, ts=_DROP),  # 8: missing
    ]
    out = decode(js(items), NOW_MS, LIMITS)
    assert [r.seq for r in out.readings] == [0, 2, 6]
    assert [(e.item_index, e.reason) for e in out.errors] == [
        (1, Reason.WRONG_TYPE),
        (3, Reason.NOT_AN_OBJECT),
        (4, Reason.VALUE_OUT_OF_RANGE),
        (5, Reason.TIMESTAMP_IN_FUTURE),
        (7, Reason.UNKNOWN_METRIC),
        (8, Reason.MISSING_FIELD),
    ]


def test_payload_exactly_at_the_limit_is_read() -> None:
    payload = GOOD + b" " * (LIMITS.max_payload_bytes - len(GOOD))
    assert len(payload) == LIMITS.max_payload_bytes
    out = decode(payload, NOW_MS, LIMITS)
    assert out.errors == [] and len(out.readings) == 1


def test_batch_exactly_at_the_limit_is_read() -> None:
    out = decode(js([item(seq=i) for i in range(LIMITS.max_batch)]), NOW_MS, LIMITS)
    assert out.errors == [] and len(out.readings) == LIMITS.max_batch


def test_default_limits() -> None:
    limits = Limits()
    assert limits.max_payload_bytes == 256 * 1024
    assert limits.max_batch == 500
    out = decode(GOOD, NOW_MS)
    assert out.errors == [] and len(out.readings) == 1


def test_decode_item_directly() -> None:
    assert decode_item(item(), 4, NOW_MS, LIMITS) == Reading(1, TS, {"no2": 40.0, "pm25": 12.0})
    err = decode_item(item(seq="x"), 4, NOW_MS, LIMITS)
    assert err == ItemError(Reason.WRONG_TYPE, err.detail, 4)
    err = decode_item(item(ts="2026-03-15T11:00:00"), None, NOW_MS, LIMITS)
    assert isinstance(err, ItemError) and err.reason is Reason.WRONG_TYPE and err.item_index is None
    assert decode_item([1], 0, NOW_MS, LIMITS).reason is Reason.NOT_AN_OBJECT


def _fromisoformat_accepts_text_after_nul() -> bool:
    try:
        datetime.fromisoformat("2026-03-15T11:00:00Z\x00hello")
    except ValueError:
        return False
    return True


def test_ts_with_embedded_nul_is_refused() -> None:
    payload = raw_item(ts='"2026-03-15T11:00:00Z\\u0000hello"')
    out = decode(payload, NOW_MS, LIMITS)
    assert out.readings == []
    assert [e.reason for e in out.errors] == [Reason.WRONG_TYPE]


# --- parse_topic ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "experiment_id", "device_id"),
    [
        pytest.param(
            "pilots/lez-san-salvario/aq-lez-01/telemetry", "lez-san-salvario", "aq-lez-01", id="example"
        ),
        pytest.param("pilots/a/b/telemetry", "a", "b", id="one-char-ids"),
        pytest.param("pilots/0/9/telemetry", "0", "9", id="digit-ids"),
        pytest.param("pilots/exp_1/dev_2/telemetry", "exp_1", "dev_2", id="underscores"),
        pytest.param(f"pilots/{'e' * 63}/{'d' * 63}/telemetry", "e" * 63, "d" * 63, id="63-char-ids"),
    ],
)
def test_parse_topic_valid(topic: str, experiment_id: str, device_id: str) -> None:
    assert parse_topic(topic) == TopicAddress(experiment_id, device_id)


@pytest.mark.parametrize(
    "topic",
    [
        pytest.param("", id="empty"),
        pytest.param("/", id="slash"),
        pytest.param("pilot/exp/dev/telemetry", id="wrong-prefix"),
        pytest.param("Pilots/exp/dev/telemetry", id="prefix-case"),
        pytest.param("pilots/exp/dev/feedback", id="wrong-suffix"),
        pytest.param("pilots/exp/dev/telemetry/", id="trailing-slash"),
        pytest.param("/pilots/exp/dev/telemetry", id="leading-slash"),
        pytest.param("pilots/exp/telemetry", id="too-few-levels"),
        pytest.param("pilots/exp/dev/extra/telemetry", id="too-many-levels"),
        pytest.param("pilots/Exp/dev/telemetry", id="uppercase-experiment"),
        pytest.param("pilots/exp/DEV-01/telemetry", id="uppercase-device"),
        pytest.param("pilots//dev/telemetry", id="empty-experiment"),
        pytest.param("pilots/exp//telemetry", id="empty-device"),
        pytest.param("pilots/+/dev/telemetry", id="wildcard-plus-experiment"),
        pytest.param("pilots/exp/+/telemetry", id="wildcard-plus-device"),
        pytest.param("pilots/+/+/telemetry", id="subscription-filter"),
        pytest.param("pilots/exp/#", id="wildcard-hash"),
        pytest.param("pilots/exp/dev/#", id="wildcard-hash-suffix"),
        pytest.param("pilots/#/dev/telemetry", id="wildcard-hash-level"),
        pytest.param(f"pilots/{'e' * 64}/dev/telemetry", id="experiment-64-chars"),
        pytest.param(f"pilots/exp/{'d' * 64}/telemetry", id="device-64-chars"),
        pytest.param(f"pilots/exp/{'d' * 10_000}/telemetry", id="device-10000-chars"),
        pytest.param("pilots/-exp/dev/telemetry", id="leading-dash"),
        pytest.param("pilots/_exp/dev/telemetry", id="leading-underscore"),
        pytest.param("pilots/exp.1/dev/telemetry", id="dot"),
        pytest.param("pilots/exp 1/dev/telemetry", id="space"),
        pytest.param("pilots/èxp/dev/telemetry", id="non-ascii"),
        pytest.param("pilots/exp/dev\x00/telemetry", id="nul"),
        pytest.param("pilots/exp/ dev/telemetry", id="leading-space"),
    ],
)
def test_parse_topic_invalid(topic: str) -> None:
    err = parse_topic(topic)
    assert isinstance(err, ItemError)
    assert err.reason is Reason.BAD_TOPIC
    assert err.item_index is None
    assert len(err.detail) < 300  # never echoes an unbounded id


@pytest.mark.parametrize(
    "topic",
    [
        pytest.param("pilots/lez-san-salvario\n/aq-lez-01/telemetry", id="newline-after-experiment"),
        pytest.param("pilots/lez-san-salvario/aq-lez-01\n/telemetry", id="newline-after-device"),
    ],
)
def test_parse_topic_refuses_trailing_newline_in_ids(topic: str) -> None:
    assert isinstance(parse_topic(topic), ItemError)


# --- properties ------------------------------------------------------------------------------

_JSON_LEAF = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
_KEYS = st.sampled_from(["seq", "ts", "metrics", *sorted(METRICS)]) | st.text(max_size=6)
_JSONISH = st.recursive(
    _JSON_LEAF,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_KEYS, children, max_size=5),
    max_leaves=25,
)


def _mostly(good: st.SearchStrategy, bad: st.SearchStrategy) -> st.SearchStrategy:
    """``good`` three times out of four (``|`` would flatten and weigh every branch alike)."""
    return st.integers(min_value=0, max_value=3).flatmap(lambda i: good if i else bad)


# values that make it past the parser more often: readings that are almost right (each
# field mostly valid, so that some items are accepted and the rest fail one by one)
_SEQ = _mostly(
    st.integers(min_value=0, max_value=10**6),
    st.one_of(
        st.integers(min_value=-3, max_value=2**64), st.booleans(), st.text(max_size=3), st.floats(), st.none()
    ),
)
_TS = _mostly(
    st.integers(min_value=NOW_MS - 6 * DAY_MS, max_value=NOW_MS),
    st.one_of(
        st.integers(min_value=NOW_MS - 10 * DAY_MS, max_value=NOW_MS + DAY_MS),
        st.integers(min_value=-(2**64), max_value=2**64),
        st.floats(),
        st.datetimes(
            min_value=datetime(2026, 3, 1),  # noqa: DTZ001 - bounds for st.datetimes are naive
            max_value=datetime(2026, 3, 20),  # noqa: DTZ001
            timezones=st.none() | st.just(UTC) | st.just(timezone(timedelta(hours=-3, minutes=-30))),
        ).map(datetime.isoformat),
        st.text(max_size=30),
        st.booleans(),
    ),
)
_METRIC_VALUE = _mostly(
    st.floats(min_value=0, max_value=1),
    st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.floats(min_value=-100, max_value=2500),
        st.integers(min_value=-(2**65), max_value=2**65),
        st.booleans(),
        st.none(),
        st.text(max_size=3),
    ),
)
_METRIC_NAME = _mostly(st.sampled_from(sorted(METRICS)), st.text(max_size=4))
_METRIC_DICT = st.dictionaries(_METRIC_NAME, _METRIC_VALUE, min_size=1, max_size=3)
_FULL = st.fixed_dictionaries({"seq": _SEQ, "ts": _TS, "metrics": _METRIC_DICT}, optional={"extra": _JSONISH})
_PARTIAL = st.fixed_dictionaries(
    {}, optional={"seq": _SEQ, "ts": _TS, "metrics": _METRIC_DICT | _JSONISH | st.just({}), "extra": _JSONISH}
)
_ALMOST = _mostly(_FULL, _PARTIAL)
_DOC = st.one_of(
    _JSONISH, _ALMOST, st.lists(_ALMOST, max_size=8), st.lists(_mostly(_ALMOST, _JSONISH), max_size=8)
)


def _check_invariants(payload: bytes, out: Decoded) -> None:
    assert isinstance(out, Decoded)
    assert out.readings or out.errors
    for err in out.errors:
        assert isinstance(err, ItemError)
        assert isinstance(err.reason, Reason)
        assert isinstance(err.detail, str) and err.detail
        assert "\x00" not in err.detail
        assert len(err.detail) < 1000
    for r in out.readings:
        assert isinstance(r, Reading)
        assert type(r.seq) is int and 0 <= r.seq < 2**63
        assert type(r.ts_ms) is int
        assert NOW_MS - LIMITS.max_age_ms <= r.ts_ms <= NOW_MS + LIMITS.max_future_ms
        assert r.metrics
        for name, value in r.metrics.items():
            assert type(value) is float
            assert math.isfinite(value)
            assert METRICS[name].low <= value <= METRICS[name].high


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_decode_never_raises_on_arbitrary_bytes(payload: bytes) -> None:
    _check_invariants(payload, decode(payload, NOW_MS, LIMITS))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_DOC, st.booleans())
def test_decode_never_raises_on_jsonish_documents(doc: object, ascii_only: bool) -> None:
    # json.dumps writes NaN/Infinity literals for non-finite floats: those must be refused too
    payload = json.dumps(doc, ensure_ascii=ascii_only).encode()
    out = decode(payload, NOW_MS, LIMITS)
    _check_invariants(payload, out)
    if (
        isinstance(doc, list)
        and 0 < len(doc) <= LIMITS.max_batch
        and not any(e.reason is Reason.MALFORMED_JSON for e in out.errors)
    ):
        # one outcome per item, each error naming its own item
        assert len(out.readings) + len(out.errors) == len(doc)
        indexes = [e.item_index for e in out.errors]
        assert len(set(indexes)) == len(indexes)
        assert all(i is not None and 0 <= i < len(doc) for i in indexes)
    elif isinstance(doc, dict):
        assert len(out.readings) + len(out.errors) == 1
        assert all(e.item_index is None for e in out.errors)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=64), st.binary(max_size=64))
def test_decode_never_raises_on_spliced_valid_payloads(prefix: bytes, suffix: bytes) -> None:
    payload = prefix + js([item(), item(seq=2)]) + suffix
    _check_invariants(payload, decode(payload, NOW_MS, LIMITS))


_VALID_METRICS = st.dictionaries(
    st.sampled_from(sorted(METRICS)),
    st.floats(min_value=0, max_value=1, allow_nan=False),
    min_size=1,
    max_size=5,
)


@settings(max_examples=150, deadline=None)
@given(
    seq=st.integers(min_value=0, max_value=2**63 - 1),
    ts=st.integers(min_value=NOW_MS - LIMITS.max_age_ms, max_value=NOW_MS + LIMITS.max_future_ms),
    metrics=_VALID_METRICS,
    as_iso=st.booleans(),
)
def test_valid_readings_are_accepted_exactly(seq: int, ts: int, metrics: dict, as_iso: bool) -> None:
    ts_value: object = ts
    if as_iso:
        ts_value = (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ts)).isoformat()
    out = decode(js({"seq": seq, "ts": ts_value, "metrics": metrics}), NOW_MS, LIMITS)
    assert out.errors == []
    assert out.readings == [Reading(seq=seq, ts_ms=ts, metrics={k: float(v) for k, v in metrics.items()})]
