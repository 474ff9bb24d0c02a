"""``ingest.pipeline.handle`` end to end on pure inputs: topic, payload, clock, registry."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.decode import TopicAddress
from ingest.pipeline import Outcome, handle
from pilotlab.contracts import Limits, Reading, ReadingBatch, Reason, Rejection, excerpt, telemetry_topic
from pilotlab.manifest import load_manifests
from pilotlab.registry import Registry

ROOT = Path(__file__).resolve().parents[2]
REGISTRY = Registry.of(load_manifests(ROOT / "control" / "examples" / "experiments"))
NOW_MS = 1_773_576_000_000  # 2026-03-15T12:00:00Z
LIMITS = Limits(max_payload_bytes=16 * 1024, max_batch=20)
TS = NOW_MS - 30_000

LEZ = "lez-san-salvario"
TOPIC_T = telemetry_topic(LEZ, "aq-lez-01")  # treatment
TOPIC_C = telemetry_topic(LEZ, "aq-ctl-02")  # control
SPOOFED = telemetry_topic(LEZ, "park-01")  # a parking sensor writing into the air-quality pilot


def reading(seq: int = 1, **metrics: float) -> dict:
    return {"seq": seq, "ts": TS + seq, "metrics": metrics or {"no2": 40.0}}


def js(doc: object) -> bytes:
    return orjson.dumps(doc)


def run(topic: str, payload: bytes, now_ms: int = NOW_MS) -> Outcome:
    return handle(topic, payload, now_ms, REGISTRY, LIMITS)


def test_valid_payload_gives_a_batch_with_the_device_group() -> None:
    out = run(TOPIC_C, js(reading(5, no2=41.5, pm25=12)))
    assert out.rejections == []
    assert out.address == TopicAddress(LEZ, "aq-ctl-02")
    assert out.batch == ReadingBatch(
        experiment_id=LEZ,
        device_id="aq-ctl-02",
        group="control",
        received_ms=NOW_MS,
        readings=(Reading(5, TS + 5, {"no2": 41.5, "pm25": 12.0}),),
    )
    assert ReadingBatch.from_json(out.batch.to_json()) == out.batch


def test_treatment_device_group() -> None:
    out = run(TOPIC_T, js([reading(1), reading(2)]))
    assert out.batch.group == "treatment"
    assert [r.seq for r in out.batch.readings] == [1, 2]


def test_mixed_batch_forwards_the_good_and_rejects_each_bad_item() -> None:
    payload = js(
        [reading(0), {"seq": -1, "ts": TS, "metrics": {"no2": 1}}, reading(2), reading(3, co2=1.0), "x"]
    )
    out = run(TOPIC_T, payload)
    assert [r.seq for r in out.batch.readings] == [0, 2]
    assert [(r.item_index, r.reason) for r in out.rejections] == [
        (1, Reason.WRONG_TYPE),
        (3, Reason.UNKNOWN_METRIC),
        (4, Reason.NOT_AN_OBJECT),
    ]
    for rej in out.rejections:
        assert rej.topic == TOPIC_T
        assert rej.experiment_id == LEZ
        assert rej.device_id == "aq-lez-01"
        assert rej.received_ms == NOW_MS
        assert rej.excerpt == excerpt(payload)
        assert rej.rejection_id == Rejection.make_id(TOPIC_T, payload, rej.item_index, str(rej.reason))
        assert Rejection.from_json(rej.to_json()) == rej
    assert len({r.rejection_id for r in out.rejections}) == 3


def test_all_bad_payload_gives_no_batch() -> None:
    out = run(TOPIC_T, b'{"seq": 1')
    assert out.batch is None
    assert out.address == TopicAddress(LEZ, "aq-lez-01")
    (rej,) = out.rejections
    assert rej.reason is Reason.MALFORMED_JSON
    assert rej.item_index is None
    assert (rej.experiment_id, rej.device_id) == (LEZ, "aq-lez-01")


def test_spoofed_topic_gives_one_rejection_with_experiment_and_device() -> None:
    for payload in (js(reading()), b"not even json", js([reading(i) for i in range(100)])):
        out = run(SPOOFED, payload)
        assert out.batch is None
        (rej,) = out.rejections  # refused before the payload is read
        assert rej.reason is Reason.DEVICE_NOT_IN_EXPERIMENT
        assert rej.experiment_id == LEZ
        assert rej.device_id == "park-01"
        assert rej.topic == SPOOFED
        assert rej.item_index is None
        assert rej.excerpt == excerpt(payload)
        assert out.address == TopicAddress(LEZ, "park-01")


@pytest.mark.parametrize(
    ("topic", "reason"),
    [
        pytest.param(
            telemetry_topic("no-such-pilot", "aq-lez-01"), Reason.UNKNOWN_EXPERIMENT, id="unknown-experiment"
        ),
        pytest.param(telemetry_topic(LEZ, "aq-lez-99"), Reason.UNKNOWN_DEVICE, id="unknown-device"),
        pytest.param(SPOOFED, Reason.DEVICE_NOT_IN_EXPERIMENT, id="spoofed"),
    ],
)
def test_registry_refusals_fill_the_address(topic: str, reason: Reason) -> None:
    out = run(topic, js(reading()))
    exp, dev = topic.split("/")[1:3]
    assert out.batch is None
    assert [(r.reason, r.experiment_id, r.device_id) for r in out.rejections] == [(reason, exp, dev)]


@pytest.mark.parametrize(
    "topic",
    [
        "pilots/lez-san-salvario/aq-lez-01/feedback",
        "pilots/lez-san-salvario/telemetry",
        "pilots/LEZ/aq-lez-01/telemetry",
        "pilots/+/+/telemetry",
        "pilots/lez-san-salvario/#",
        "",
        "x" * 70_000,
    ],
)
def test_bad_topic_has_no_experiment(topic: str) -> None:
    payload = js(reading())
    out = run(topic, payload)
    assert out.batch is None
    assert out.address is None
    (rej,) = out.rejections
    assert rej.reason is Reason.BAD_TOPIC
    assert rej.experiment_id is None
    assert rej.device_id is None
    assert rej.item_index is None
    assert rej.topic == topic
    assert rej.excerpt == excerpt(payload)
    assert rej.rejection_id == Rejection.make_id(topic, payload, None, "bad_topic")


def test_newline_in_topic_is_a_bad_topic() -> None:
    (rej,) = run("pilots/lez-san-salvario/aq-lez-01\n/telemetry", js(reading())).rejections
    assert rej.reason is Reason.BAD_TOPIC


def test_redelivery_gives_the_same_rejection_ids() -> None:
    payload = js([reading(0), {"seq": "x"}, reading(2, no2=-5.0), {"seq": 3}])
    first = run(TOPIC_T, payload)
    again = run(TOPIC_T, payload)
    later = run(TOPIC_T, payload, NOW_MS + 1000)  # redelivered a second later
    ids = [r.rejection_id for r in first.rejections]
    assert len(ids) == 3 and len(set(ids)) == 3
    assert [r.rejection_id for r in again.rejections] == ids
    assert [r.rejection_id for r in later.rejections] == ids
    assert first.rejections == again.rejections
    assert first.batch == again.batch
    # another device sending the same bytes is another rejection
    other = run(TOPIC_C, payload)
    assert not {r.rejection_id for r in other.rejections} & set(ids)


def test_redelivery_of_refused_and_bad_topic_messages() -> None:
    for topic in (SPOOFED, "bad/topic", telemetry_topic("nope", "nope")):
        assert (
            run(topic, b"{}").rejections[0].rejection_id
            == run(topic, b"{}", NOW_MS + 5).rejections[0].rejection_id
        )
        assert run(topic, b"{}").rejections[0].rejection_id != run(topic, b"{ }").rejections[0].rejection_id


def test_payload_too_large_is_rejected_with_a_bounded_excerpt() -> None:
    payload = b"[" + b" " * LIMITS.max_payload_bytes + b"]"
    (rej,) = run(TOPIC_T, payload).rejections
    assert rej.reason is Reason.PAYLOAD_TOO_LARGE
    assert len(rej.excerpt) <= Rejection.EXCERPT_BYTES + 1
    assert rej.excerpt.endswith("…")


def test_nul_bytes_never_reach_a_rejection() -> None:
    payload = b'{"seq": 1,\x00 "ts": 0}' + b"\x00" * 300
    (rej,) = run(TOPIC_T, payload).rejections
    assert rej.reason is Reason.MALFORMED_JSON
    assert "\x00" not in rej.excerpt and "\x00" not in rej.detail
    assert "\x00" not in rej.to_json().decode()


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from([TOPIC_T, TOPIC_C, SPOOFED, "pilots/x/y/z"]),
    st.one_of(
        st.binary(max_size=200),
        st.lists(
            st.fixed_dictionaries(
                {
                    "seq": st.integers(-1, 5),
                    "ts": st.integers(TS - 10**9, TS + 10**9),
                    "metrics": st.dictionaries(st.sampled_from(["no2", "pm25", "co2"]), st.floats(-10, 3000)),
                }
            ),
            max_size=25,
        ).map(orjson.dumps),
    ),
)
def test_handle_invariants(topic: str, payload: bytes) -> None:
    out = handle(topic, payload, NOW_MS, REGISTRY, LIMITS)
    assert out.batch is not None or out.rejections
    ids = [r.rejection_id for r in out.rejections]
    assert len(ids) == len(set(ids))
    assert all(isinstance(r.reason, Reason) for r in out.rejections)
    assert all(r.received_ms == NOW_MS and r.topic == topic for r in out.rejections)
    assert all("\x00" not in r.excerpt + r.detail for r in out.rejections)
    if out.batch is not None:
        assert out.batch.readings
        assert out.batch.group == REGISTRY.authorise(out.batch.experiment_id, out.batch.device_id).group
        assert all(r.experiment_id == out.batch.experiment_id for r in out.rejections)
    if topic == SPOOFED:
        assert out.batch is None
        assert [r.reason for r in out.rejections] == [Reason.DEVICE_NOT_IN_EXPERIMENT]
    # a redelivery is the same outcome
    assert handle(topic, payload, NOW_MS, REGISTRY, LIMITS) == out
