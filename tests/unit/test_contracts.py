"""The shared records: JSON round trips, epoch-millisecond conversions, rejection ids, excerpts."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pilotlab.contracts import (
    KafkaTopics,
    KpiValue,
    Reading,
    ReadingBatch,
    Reason,
    Rejection,
    decode_kpis,
    encode_kpi_records,
    encode_kpis,
    excerpt,
    feedback_topic,
    from_ms,
    telemetry_topic,
    to_ms,
)
from pilotlab.metrics import METRICS

NOW_MS = 1_773_576_000_000
MIN_MS = to_ms(datetime.min.replace(tzinfo=UTC))
MAX_MS = to_ms(datetime.max.replace(tzinfo=UTC))


# --- topics and reasons ------------------------------------------------------------------------


def test_topic_helpers() -> None:
    assert telemetry_topic("lez", "aq-1") == "pilots/lez/aq-1/telemetry"
    assert feedback_topic("lez", "aq-1") == "pilots/lez/aq-1/feedback"
    assert set(KafkaTopics.COMPACTED) <= set(KafkaTopics.ALL)
    assert len(set(KafkaTopics.ALL)) == len(KafkaTopics.ALL)


def test_reason_codes_are_stable_strings() -> None:
    # startups code against these values: renaming one is a breaking change
    assert {str(r) for r in Reason} == {
        "bad_topic",
        "malformed_json",
        "payload_too_large",
        "batch_too_large",
        "not_an_object",
        "missing_field",
        "wrong_type",
        "non_finite",
        "value_out_of_range",
        "timestamp_in_future",
        "timestamp_too_old",
        "unknown_experiment",
        "unknown_device",
        "device_not_in_experiment",
        "unknown_metric",
        "storage_refused",
        "unknown_unit",
        "unsupported_senml",
        "duplicate",
        "conflicting_reading",
    }
    for r in Reason:
        assert str(r) == r.value == f"{r}"
        assert orjson.dumps(r) == orjson.dumps(r.value)


# --- epoch milliseconds ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dt", "ms"),
    [
        (datetime(1970, 1, 1, tzinfo=UTC), 0),
        (datetime(2026, 3, 15, 12, tzinfo=UTC), NOW_MS),
        (datetime(2026, 3, 15, 13, tzinfo=timezone(timedelta(hours=1))), NOW_MS),
        (datetime(2026, 3, 15, 12, 0, 0, 999, tzinfo=UTC), NOW_MS),  # microseconds floor
        (datetime(2026, 3, 15, 12, 0, 0, 1000, tzinfo=UTC), NOW_MS + 1),
        (datetime(1969, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC), -1),  # floor, not truncation
        (datetime(1969, 12, 31, 23, 59, 59, 999_000, tzinfo=UTC), -1),
    ],
)
def test_to_ms_table(dt: datetime, ms: int) -> None:
    assert to_ms(dt) == ms
    assert type(to_ms(dt)) is int


def test_from_ms_is_aware_utc() -> None:
    dt = from_ms(NOW_MS)
    assert dt == datetime(2026, 3, 15, 12, tzinfo=UTC)
    assert dt.utcoffset() == timedelta(0)


def test_to_ms_is_exact_where_floats_are_not() -> None:
    dt = datetime(2262, 4, 11, 23, 47, 16, 854_775, tzinfo=UTC)
    assert to_ms(dt) == 9_223_372_036_854
    big = datetime(9999, 12, 31, 23, 59, 59, 999_000, tzinfo=UTC)
    assert to_ms(big) == MAX_MS
    assert from_ms(MAX_MS) == big


def test_to_ms_needs_an_aware_datetime() -> None:
    with pytest.raises(TypeError):
        to_ms(datetime(2026, 3, 15))  # noqa: DTZ001


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=MIN_MS, max_value=MAX_MS))
def test_to_ms_from_ms_round_trip(ms: int) -> None:
    assert to_ms(from_ms(ms)) == ms


@settings(max_examples=200, deadline=None)
@given(
    st.datetimes(
        min_value=datetime(1, 1, 2),  # noqa: DTZ001 - bounds are naive for st.datetimes
        max_value=datetime(9999, 12, 30),  # noqa: DTZ001
        timezones=st.sampled_from(
            [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=11))]
        ),
    )
)
def test_from_ms_to_ms_truncates_to_the_millisecond(dt: datetime) -> None:
    back = from_ms(to_ms(dt))
    assert back <= dt < back + timedelta(milliseconds=1)
    assert back.microsecond % 1000 == 0


# --- ReadingBatch -------------------------------------------------------------------------------------

_METRICS = st.dictionaries(
    st.sampled_from(sorted(METRICS)),
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e300, max_value=1e300),
    min_size=1,
    max_size=5,
)
_READINGS = st.lists(
    st.builds(
        Reading,
        seq=st.integers(min_value=0, max_value=2**63 - 1),
        ts_ms=st.integers(min_value=-(2**53), max_value=2**53),
        metrics=_METRICS,
    ),
    max_size=20,
).map(tuple)
_ID = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,62}", fullmatch=True)


def test_reading_batch_round_trip_example() -> None:
    batch = ReadingBatch(
        "lez",
        "aq-1",
        "control",
        NOW_MS,
        (Reading(1, NOW_MS - 1, {"no2": 40.0, "pm25": 0.1}), Reading(2, NOW_MS, {"noise": 55.5})),
    )
    raw = batch.to_json()
    assert orjson.loads(raw) == {
        "experiment_id": "lez",
        "device_id": "aq-1",
        "group": "control",
        "received_ms": NOW_MS,
        "readings": [[1, NOW_MS - 1, {"no2": 40.0, "pm25": 0.1}], [2, NOW_MS, {"noise": 55.5}]],
    }
    back = ReadingBatch.from_json(raw)
    assert back == batch
    assert isinstance(back.readings, tuple)
    assert all(type(v) is float for r in back.readings for v in r.metrics.values())
    # decoded readings are built through their slots: still whole, equal, printable and frozen
    first = back.readings[0]
    assert (first.seq, first.ts_ms, first.metrics) == (1, NOW_MS - 1, {"no2": 40.0, "pm25": 0.1})
    assert repr(first) == repr(batch.readings[0])
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.seq = 2  # type: ignore[misc]


@settings(max_examples=150, deadline=None)
@given(
    _ID, _ID, st.sampled_from(["treatment", "control"]), st.integers(min_value=0, max_value=2**53), _READINGS
)
def test_reading_batch_round_trip(exp: str, dev: str, group: str, received: int, readings) -> None:
    batch = ReadingBatch(exp, dev, group, received, readings)
    back = ReadingBatch.from_json(batch.to_json())
    assert back == batch
    assert back.to_json() == batch.to_json()


# --- Rejection --------------------------------------------------------------------------------------


def rejection(**kw) -> Rejection:
    fields = {
        "reason": Reason.WRONG_TYPE,
        "detail": "seq must be a non-negative integer below 2^63",
        "topic": "pilots/lez/aq-1/telemetry",
        "received_ms": NOW_MS,
        "experiment_id": "lez",
        "device_id": "aq-1",
        "item_index": 3,
        "excerpt": '[{"seq": -1}]',
        "rejection_id": Rejection.make_id("pilots/lez/aq-1/telemetry", b"x", 3, "wrong_type"),
    }
    fields.update(kw)
    return Rejection(**fields)


@pytest.mark.parametrize(
    "rej",
    [
        pytest.param(rejection(), id="full"),
        pytest.param(rejection(experiment_id=None, device_id=None, item_index=None, excerpt=""), id="nulls"),
        pytest.param(rejection(detail="ünïcödé ✓ \\0", excerpt="�\\0…"), id="unicode"),
        pytest.param(Rejection(Reason.BAD_TOPIC, "d", "t", 0), id="defaults"),
    ],
)
def test_rejection_round_trip(rej: Rejection) -> None:
    raw = rej.to_json()
    back = Rejection.from_json(raw)
    assert back == rej
    assert back.reason is rej.reason
    d = orjson.loads(raw)
    assert d["reason"] == str(rej.reason)
    assert set(d) == {
        "rejection_id",
        "reason",
        "detail",
        "topic",
        "received_ms",
        "experiment_id",
        "device_id",
        "item_index",
        "excerpt",
    }


_REJECTIONS = st.builds(
    Rejection,
    reason=st.sampled_from(list(Reason)),
    detail=st.text(max_size=50),
    topic=st.text(max_size=50),
    received_ms=st.integers(min_value=0, max_value=2**53),
    experiment_id=st.none() | _ID,
    device_id=st.none() | _ID,
    item_index=st.none() | st.integers(min_value=0, max_value=10_000),
    excerpt=st.binary(max_size=300).map(excerpt),
    rejection_id=st.text(alphabet="0123456789abcdef", min_size=32, max_size=32),
)


@settings(max_examples=100, deadline=None)
@given(_REJECTIONS)
def test_rejection_round_trip_property(rej: Rejection) -> None:
    assert Rejection.from_json(rej.to_json()) == rej


def test_rejection_from_json_refuses_unknown_reason() -> None:
    raw = rejection().to_json().replace(b'"wrong_type"', b'"made_up"')
    with pytest.raises(ValueError):
        Rejection.from_json(raw)


# --- Rejection.make_id ----------------------------------------------------------------------------

ARGS = ("pilots/lez/aq-1/telemetry", b'{"seq": -1}', 0, "wrong_type")


def test_make_id_is_deterministic_and_hex() -> None:
    a = Rejection.make_id(*ARGS)
    assert a == Rejection.make_id(*ARGS)
    assert len(a) == 32
    int(a, 16)
    # pinned: ids are primary keys in storage, so they must not change between releases
    assert a == "aabea9e698b5b0ea1df04de22812133e"


@pytest.mark.parametrize(
    "changed",
    [
        pytest.param(("pilots/lez/aq-2/telemetry", *ARGS[1:]), id="topic"),
        pytest.param((ARGS[0], b'{"seq": -2}', *ARGS[2:]), id="payload"),
        pytest.param((ARGS[0], ARGS[1] + b" ", *ARGS[2:]), id="payload-whitespace"),
        pytest.param((*ARGS[:2], 1, ARGS[3]), id="item-index"),
        pytest.param((*ARGS[:2], None, ARGS[3]), id="item-index-none"),
        pytest.param((*ARGS[:3], "missing_field"), id="reason"),
    ],
)
def test_make_id_is_sensitive_to_each_argument(changed: tuple) -> None:
    assert Rejection.make_id(*changed) != Rejection.make_id(*ARGS)


def test_make_id_has_no_boundary_ambiguity() -> None:
    # length-prefixed parts: moving bytes between topic and payload changes the id
    assert Rejection.make_id("ab", b"c", None, "r") != Rejection.make_id("a", b"bc", None, "r")
    assert Rejection.make_id("", b"", None, "r") != Rejection.make_id("", b"", None, "")


@settings(max_examples=200, deadline=None)
@given(
    st.text(max_size=20),
    st.binary(max_size=40),
    st.none() | st.integers(0, 1000),
    st.sampled_from(list(Reason)),
)
def test_make_id_property(topic: str, payload: bytes, index: int | None, reason: Reason) -> None:
    a = Rejection.make_id(topic, payload, index, str(reason))
    assert a == Rejection.make_id(topic, bytes(payload), index, str(reason))
    assert len(a) == 32
    assert a != Rejection.make_id(topic + "x", payload, index, str(reason))
    assert a != Rejection.make_id(topic, payload + b"x", index, str(reason))


# --- excerpt --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"", ""),
        (b'{"seq": 1}', '{"seq": 1}'),
        (b"a\x00b", "a\\0b"),
        (b"\xff", "\ufffd"),
        (b"x" * 256, "x" * 256),
        (b"x" * 257, "x" * 256 + "…"),
        ("é".encode() * 200, "é" * 128 + "…"),
    ],
)
def test_excerpt_table(payload: bytes, expected: str) -> None:
    assert excerpt(payload) == expected


def test_excerpt_limit_argument() -> None:
    assert excerpt(b"abcdef", limit=3) == "abc…"
    assert excerpt(b"abc", limit=3) == "abc"
    assert Rejection.EXCERPT_BYTES == 256


def test_excerpt_cut_inside_a_multibyte_character() -> None:
    payload = b"a" + "é".encode() * 200  # the 256-byte cut falls inside an 'é'
    out = excerpt(payload)
    assert out.endswith("\ufffd…")
    assert "\x00" not in out


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1024), st.integers(min_value=1, max_value=300))
def test_excerpt_is_bounded_and_safe(payload: bytes, limit: int) -> None:
    out = excerpt(payload, limit)
    assert isinstance(out, str)
    assert "\x00" not in out
    # at most one character per byte read, a NUL becomes two, plus the ellipsis
    assert len(out) <= 2 * limit + 1
    assert out.endswith("…") == (len(payload) > limit)
    out.encode("utf-8")  # no lone surrogates: storable as UTF-8 text
    if b"\x00" not in payload[:limit]:
        assert len(out) <= limit + 1


def test_excerpt_of_text_payload_roundtrips() -> None:
    payload = b'{"seq": 1, "ts": "2026-03-15T12:00:00Z", "metrics": {"no2": 40}}'
    assert excerpt(payload) == payload.decode()


# --- KpiValue ---------------------------------------------------------------------------------------


def kpi_value(**kw) -> KpiValue:
    fields = {
        "experiment_id": "lez",
        "kpi": "no2_mean",
        "metric": "no2",
        "kind": "mean",
        "device_group": "treatment",
        "window_size_s": 60,
        "window_start_ms": NOW_MS,
        "value": 41.25,
        "sample_count": 4,
        "revision": 2,
    }
    fields.update(kw)
    return KpiValue(**fields)


def test_kpi_value_round_trip() -> None:
    values = [kpi_value(), kpi_value(kpi="no2_min", kind="min", value=None, revision=1), kpi_value(value=0.0)]
    raw = encode_kpis(values)
    assert decode_kpis(raw) == values
    assert [KpiValue.from_dict(v.to_dict()) for v in values] == values
    assert decode_kpis(encode_kpis([])) == []


@pytest.mark.parametrize("n", [1, 2, 7, 300])
def test_kpi_records_stay_under_their_limit_and_carry_every_value_once(n) -> None:
    values = [kpi_value(window_start_ms=NOW_MS + i * 60_000, revision=i) for i in range(n)]
    limit = 2_000
    records = encode_kpi_records(values, limit)
    assert [v for r in records for v in decode_kpis(r)] == values
    assert all(len(r) <= limit for r in records)
    assert len(records) == (1 if len(encode_kpis(values)) <= limit else len(records))
    assert encode_kpi_records(values) == [encode_kpis(values)]  # under the default 512 KiB: one record


def test_kpi_value_key() -> None:
    v = kpi_value()
    assert v.key() == ("lez", "no2_mean", "treatment", 60, NOW_MS)
    assert kpi_value(revision=9, value=1.0, sample_count=99).key() == v.key()
    assert kpi_value(window_size_s=3600).key() != v.key()
    assert kpi_value(device_group="control").key() != v.key()


@settings(max_examples=100, deadline=None)
@given(
    st.none() | st.floats(allow_nan=False, allow_infinity=False),
    st.integers(min_value=0, max_value=2**62),
    st.integers(min_value=1, max_value=2**31 - 1),
    st.integers(min_value=-(2**53), max_value=2**53),
)
def test_kpi_value_round_trip_property(value, count, revision, start) -> None:
    v = kpi_value(value=value, sample_count=count, revision=revision, window_start_ms=start)
    assert decode_kpis(encode_kpis([v])) == [v]
