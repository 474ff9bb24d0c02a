"""SenML JSON (RFC 8428) on the telemetry topic, and the metric/unit normalisation table.

Pure: a fixed clock, bytes in, readings and reason-coded errors out.
"""

from __future__ import annotations

import json
import math

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.decode import decode
from ingest.senml import SENML_LABELS, is_senml
from pilotlab.contracts import Limits, Reading, Reason
from pilotlab.metrics import METRIC_ALIASES, METRICS, UNITS, canonical_metric, convert

NOW_MS = 1_773_576_000_000  # 2026-03-15T12:00:00Z
NOW_S = NOW_MS // 1000
DAY_MS = 86_400_000
LIMITS = Limits(max_payload_bytes=64 * 1024, max_batch=50, max_age_ms=7 * DAY_MS, max_future_ms=300_000)


def js(doc: object) -> bytes:
    return orjson.dumps(doc)


def run(doc: object):
    return decode(doc if isinstance(doc, bytes) else js(doc), NOW_MS, LIMITS)


# --- good packs ---------------------------------------------------------------------------------


def test_rfc_style_pack_with_base_name_time_and_unit() -> None:
    out = run(
        [
            {"bn": "urn:dev:ow:10e2073a01080063:", "bt": NOW_S - 60, "bu": "ug/m3", "n": "no2", "v": 38.2},
            {"n": "pm2.5", "v": 11},
            {"n": "no2", "t": 30, "v": 40.0},
        ]
    )
    assert out.errors == []
    assert out.senml
    assert out.readings == [
        Reading(0, NOW_MS - 60_000, {"no2": 38.2, "pm25": 11.0}),
        Reading(0, NOW_MS - 30_000, {"no2": 40.0}),
    ]


def test_relative_times_count_from_now_and_no_time_is_now() -> None:
    out = run([{"n": "no2", "v": 1, "t": -120}, {"n": "pm25", "v": 2}])
    assert out.errors == []
    assert [r.ts_ms for r in out.readings] == [NOW_MS - 120_000, NOW_MS]


def test_fractional_epoch_seconds_become_exact_milliseconds() -> None:
    out = run([{"n": "no2", "v": 1, "t": NOW_S - 10 + 0.123}])
    assert out.readings[0].ts_ms == NOW_MS - 10_000 + 123


def test_base_value_is_added_and_units_convert() -> None:
    # bv + v = 15 mg/m3 = 15000 ug/m3, beyond no2's physical range: refused, not stored
    out = run([{"bv": 10, "n": "no2", "v": 5, "u": "mg/m3", "t": -1}])
    assert [e.reason for e in out.errors] == [Reason.VALUE_OUT_OF_RANGE]
    out = run([{"bv": 0.01, "n": "no2", "v": 0.02, "u": "mg/m3"}])
    assert out.readings[0].metrics["no2"] == pytest.approx(30.0)


@pytest.mark.parametrize(
    ("name", "unit", "value", "metric", "expected"),
    [
        ("temperature", "Cel", 21.5, "temperature", 21.5),
        ("temp", "K", 294.65, "temperature", 21.5),
        ("temperature", "degF", 50, "temperature", 10.0),
        ("occupancy", "%", 42, "occupancy", 0.42),
        ("occupancy", "/", 0.42, "occupancy", 0.42),
        ("speed", "m/s", 10, "mean_speed", 36.0),
        ("energy", "Wh", 250, "energy", 0.25),
        ("PM2.5", "µg/m³", 12, "pm25", 12.0),
        ("PM25", "μg/m³", 12, "pm25", 12.0),  # Greek mu
        ("pm_10", "mg/m3", 0.02, "pm10", 20.0),
        ("fill-level", "%", 75, "fill_level", 0.75),
        ("noise", "dBA", 61, "noise", 61.0),
    ],
)
def test_names_and_units_are_normalised(name, unit, value, metric, expected) -> None:
    out = run([{"n": name, "u": unit, "v": value}])
    assert out.errors == []
    (reading,) = out.readings
    assert reading.metrics == {metric: pytest.approx(expected)}


def test_native_format_normalises_metric_names_too() -> None:
    out = run({"seq": 1, "ts": NOW_MS, "metrics": {"PM2.5": 12, "NO2": 40}})
    assert out.errors == [] and not out.senml
    assert out.readings == [Reading(1, NOW_MS, {"pm25": 12.0, "no2": 40.0})]


def test_records_at_one_time_form_one_reading_and_bad_records_fail_alone() -> None:
    out = run(
        [
            {"bt": NOW_S - 5, "n": "no2", "v": 40},
            {"n": "pm25", "vs": "high"},  # unsupported value kind
            {"n": "pm25", "v": 12, "u": "ppm"},  # unknown unit for pm25
            {"n": "pm10", "v": 20},
        ]
    )
    assert [(e.reason, e.item_index) for e in out.errors] == [
        (Reason.UNSUPPORTED_SENML, 1),
        (Reason.UNKNOWN_UNIT, 2),
    ]
    assert out.readings == [Reading(0, NOW_MS - 5000, {"no2": 40.0, "pm10": 20.0})]


def test_is_senml_is_unambiguous_against_the_native_format() -> None:
    assert is_senml([{"n": "no2", "v": 1}])
    assert not is_senml([{"seq": 1, "ts": NOW_MS, "metrics": {}}])
    assert not is_senml({"n": "no2", "v": 1})  # a pack is always an array
    assert not is_senml([{"metrics": {}, "n": "no2"}])  # `metrics` makes it native
    assert not is_senml([])
    assert SENML_LABELS.isdisjoint({"seq", "ts", "metrics"})


# --- the SenML bad-input catalogue ------------------------------------------------------------

REC = {"n": "no2", "v": 40.0}
SENML_BAD: list = [
    pytest.param([{"n": "no2", "vs": "40"}], Reason.UNSUPPORTED_SENML, id="string-value"),
    pytest.param([{"n": "no2", "vb": True}], Reason.UNSUPPORTED_SENML, id="boolean-value"),
    pytest.param([{"n": "no2", "vd": "AAEC"}], Reason.UNSUPPORTED_SENML, id="data-value"),
    pytest.param([{"n": "no2", "v": 1, "vs": "1"}], Reason.UNSUPPORTED_SENML, id="two-value-fields"),
    pytest.param([{"n": "no2", "s": 10}], Reason.UNSUPPORTED_SENML, id="sum-only"),
    pytest.param([{"n": "no2", "v": 1, "bs": 10}], Reason.UNSUPPORTED_SENML, id="base-sum"),
    pytest.param([{"bver": 11, **REC}], Reason.UNSUPPORTED_SENML, id="newer-version"),
    pytest.param([{"n": "no2", "v": 1, "foo_": 1}], Reason.UNSUPPORTED_SENML, id="must-understand-label"),
    pytest.param({"n": "no2", "v": 1}, Reason.UNSUPPORTED_SENML, id="bare-record-without-array"),
    pytest.param([{"n": "no2"}], Reason.MISSING_FIELD, id="no-value"),
    pytest.param([{"v": 1}], Reason.MISSING_FIELD, id="no-name"),
    pytest.param([{"n": "no2", "v": "40"}], Reason.WRONG_TYPE, id="v-as-string"),
    pytest.param([{"n": "no2", "v": True}], Reason.WRONG_TYPE, id="v-as-bool"),
    pytest.param([{"n": "no2", "v": None}], Reason.WRONG_TYPE, id="v-null"),
    pytest.param([{"n": 7, "v": 1}], Reason.WRONG_TYPE, id="n-number"),
    pytest.param([{"n": "no 2", "v": 1}], Reason.WRONG_TYPE, id="name-with-space"),
    pytest.param([{"n": "-no2", "v": 1}], Reason.WRONG_TYPE, id="name-starting-with-dash"),
    pytest.param([{"bn": 5, **REC}], Reason.WRONG_TYPE, id="bn-number"),
    pytest.param([{"bt": "now", **REC}], Reason.WRONG_TYPE, id="bt-string"),
    pytest.param([{"n": "no2", "v": 1, "t": "now"}], Reason.WRONG_TYPE, id="t-string"),
    pytest.param([{"n": "no2", "v": 1, "u": 3}], Reason.WRONG_TYPE, id="u-number"),
    pytest.param([{"bver": "10", **REC}], Reason.WRONG_TYPE, id="bver-string"),
    pytest.param([{"n": "co2", "v": 400}], Reason.UNKNOWN_METRIC, id="unknown-metric"),
    pytest.param([{"bn": "dev1/", "v": 400}], Reason.UNKNOWN_METRIC, id="name-ends-in-separator"),
    pytest.param([{"n": "no2", "v": 40, "u": "ppb"}], Reason.UNKNOWN_UNIT, id="ppb-not-convertible"),
    pytest.param([{"n": "no2", "v": 40, "u": "km/h"}], Reason.UNKNOWN_UNIT, id="unit-of-another-quantity"),
    pytest.param([{"n": "no2", "v": 40, "u": "MG/M3"}], Reason.UNKNOWN_UNIT, id="unit-case-is-not-guessed"),
    pytest.param([{"bu": "furlong", **REC}], Reason.UNKNOWN_UNIT, id="unknown-base-unit"),
    pytest.param([{"n": "occupancy", "v": 142, "u": "/"}], Reason.VALUE_OUT_OF_RANGE, id="ratio-given-as-percent"),
    pytest.param([{"n": "no2", "v": 1, "t": NOW_MS}], Reason.TIMESTAMP_IN_FUTURE, id="milliseconds-not-seconds"),
    pytest.param([{"n": "no2", "v": 1, "t": NOW_S + 3600}], Reason.TIMESTAMP_IN_FUTURE, id="future"),
    pytest.param([{"n": "no2", "v": 1, "t": NOW_S - 8 * 86400}], Reason.TIMESTAMP_TOO_OLD, id="too-old"),
    pytest.param([{"n": "no2", "v": 1, "t": 2**28}], Reason.TIMESTAMP_TOO_OLD, id="absolute-1978"),
    pytest.param([{"n": "no2", "v": 1, "t": -(2**28)}], Reason.TIMESTAMP_TOO_OLD, id="before-1970"),
    pytest.param([{"n": "no2", "v": 1, "t": -1e300}], Reason.TIMESTAMP_TOO_OLD, id="t-minus-1e300"),
    pytest.param([{"n": "no2", "v": 1, "t": 1e300}], Reason.TIMESTAMP_IN_FUTURE, id="t-1e300"),
    pytest.param([{"bv": 1e308, "n": "no2", "v": 1e308}], Reason.NON_FINITE, id="bv-plus-v-overflows"),
    pytest.param(b'[{"n": "no2", "v": NaN}]', Reason.NON_FINITE, id="v-NaN"),
    pytest.param(b'[{"n": "no2", "v": 1e400}]', Reason.NON_FINITE, id="v-1e400"),
    pytest.param(b'[{"n": "no2", "v": ' + b"9" * 4000 + b"}]", Reason.NON_FINITE, id="v-4000-digits"),
    pytest.param(b'[{"n": "no2", "v": 1, "t": -Infinity}]', Reason.NON_FINITE, id="t-minus-Infinity"),
    pytest.param([REC, 1], Reason.NOT_AN_OBJECT, id="second-record-is-a-number"),
    pytest.param([REC] * (LIMITS.max_batch + 1), Reason.BATCH_TOO_LARGE, id="pack-beyond-max-batch"),
    pytest.param(b'[{"n": "no2", "v": 1, "n": "\\ud800"}]', Reason.MALFORMED_JSON, id="lone-surrogate"),
    pytest.param(b'[{"n": "no2", "v": 1}, {"n": "no2\x00", "v": 1}]', Reason.MALFORMED_JSON, id="raw-nul"),
]


@pytest.mark.parametrize(("payload", "reason"), SENML_BAD)
def test_senml_bad_input_is_refused_with_its_reason(payload: object, reason: Reason) -> None:
    out = run(payload)
    assert reason in {e.reason for e in out.errors}, out.errors
    for e in out.errors:
        assert e.detail and "\x00" not in e.detail


def test_senml_catalogue_size() -> None:
    assert len(SENML_BAD) >= 40
    assert len({p.id for p in SENML_BAD}) == len(SENML_BAD)


def test_same_metric_twice_at_one_time_is_a_duplicate() -> None:
    out = run([{"bt": NOW_S, "n": "no2", "v": 1}, {"n": "no2", "v": 2}])
    assert [(e.reason, e.item_index) for e in out.errors] == [(Reason.DUPLICATE, 1)]
    assert out.readings == [Reading(0, NOW_MS, {"no2": 1.0})]


def test_a_broken_base_field_leaves_later_records_unresolved() -> None:
    out = run([REC, {"bt": "later", **REC}, {"n": "pm25", "v": 3}])
    assert [(e.reason, e.item_index) for e in out.errors] == [(Reason.WRONG_TYPE, 1), (Reason.WRONG_TYPE, 2)]
    assert out.readings == [Reading(0, NOW_MS, {"no2": 40.0})]


def test_must_understand_label_refuses_the_whole_pack() -> None:
    out = run([REC, {"n": "pm25", "v": 1, "x_": 1}, {"n": "pm10", "v": 2}])
    assert out.readings == []
    assert [(e.reason, e.item_index) for e in out.errors] == [(Reason.UNSUPPORTED_SENML, i) for i in range(3)]


def test_unknown_optional_labels_are_ignored() -> None:
    out = run([{**REC, "ut": 60, "extra": "x"}])
    assert out.errors == [] and out.readings == [Reading(0, NOW_MS, {"no2": 40.0})]


# --- the table ------------------------------------------------------------------------------------


def test_every_alias_points_at_a_metric_and_every_unit_at_a_canonical_unit() -> None:
    assert set(METRIC_ALIASES.values()) <= set(METRICS)
    canonical_units = {m.unit for m in METRICS.values()}
    assert {u.canonical for u in UNITS.values()} <= canonical_units
    for m in METRICS.values():
        assert convert(m, m.unit, 1.5) == 1.5, f"{m.name}: its canonical unit converts to itself"


@pytest.mark.parametrize("spelling", ["pm2.5", "PM2.5", "PM25", "pm_2.5", "PM 2.5", "pm25"])
def test_pm25_spellings(spelling: str) -> None:
    assert canonical_metric(spelling) == "pm25"


def test_no_guessing() -> None:
    assert canonical_metric("pm2") is None
    assert canonical_metric("x" * 1000) is None
    assert convert(METRICS["no2"], "ppm", 1.0) is None  # needs molar mass and temperature: refused
    assert convert(METRICS["temperature"], "K", 273.15) == pytest.approx(0.0)


# --- fuzzing ------------------------------------------------------------------------------------

_SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
_LABEL = st.sampled_from(sorted(SENML_LABELS | {"x_", "other"}))
_NAMES = st.sampled_from(["no2", "pm2.5", "PM25", "temp", "occupancy", "co2", "", "a b", "dev/"])
_UNITS = st.sampled_from([*list(UNITS)[:12], "ppb", "", "MG/M3"])
_RECORD = st.one_of(
    st.dictionaries(_LABEL, _SCALAR, max_size=6),
    st.fixed_dictionaries(
        {"n": _NAMES, "v": st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6)},
        optional={
            "u": _UNITS,
            "t": st.floats(min_value=-1e6, max_value=2e9, allow_nan=False),
            "bt": st.integers(min_value=-(10**6), max_value=NOW_S + 10**6),
            "bn": st.sampled_from(["", "urn:dev:x:", "dev-1/"]),
            "bv": st.integers(-10, 10),
        },
    ),
    _SCALAR,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_RECORD, min_size=1, max_size=8))
def test_senml_fuzz_every_record_is_accepted_or_refused_with_a_code(pack: list) -> None:
    payload = json.dumps(pack).encode()  # the stdlib writes integers beyond 64 bits too
    out = decode(payload, NOW_MS, LIMITS)  # must not raise
    assert all(isinstance(e.reason, Reason) and e.detail for e in out.errors)
    if is_senml(pack):
        refused = {e.item_index for e in out.errors}
        assert None not in refused or len(pack) > LIMITS.max_batch
        accepted_values = sum(len(r.metrics) for r in out.readings)
        assert accepted_values + len(refused) <= len(pack)
        assert accepted_values + len(out.errors) == len(pack), "each record is accepted or refused once"
    for r in out.readings:
        for name, value in r.metrics.items():
            m = METRICS[name]
            assert math.isfinite(value) and m.low <= value <= m.high
        assert NOW_MS - LIMITS.max_age_ms <= r.ts_ms <= NOW_MS + LIMITS.max_future_ms
