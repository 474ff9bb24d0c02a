"""The fault planner: same seed → identical stream; each fault at its declared rate (counted);
the ground truth agrees with what ingest's own pure pipeline does with every message."""

from __future__ import annotations

import math
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ingest.dedup import SeqMemory
from ingest.pipeline import handle, remember, screen_duplicates
from pilotlab.contracts import Reason
from pilotlab.registry import Registry
from simulators.faults import Run, digest, plan, receive_ms
from simulators.spec import load_scenario, parse_scenario

REPO = Path(__file__).resolve().parents[2]
ANCHOR = datetime(2026, 3, 20, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def scenario():
    return load_scenario(REPO / "control" / "examples" / "scenarios" / "lighting-faults.yaml")


@pytest.fixture(scope="module")
def planned(scenario):
    return plan(scenario, ANCHOR)


def within(count: int, n: int, rate: float, sigmas: float = 4.0) -> bool:
    """``count`` out of ``n`` Bernoulli(rate) trials is within ``sigmas`` standard deviations."""
    sd = math.sqrt(n * rate * (1 - rate))
    return abs(count - n * rate) <= sigmas * sd + 1


def test_same_seed_identical_stream_other_seed_different(scenario, planned):
    messages, truth = planned
    again, truth2 = plan(scenario, ANCHOR)
    assert digest(messages) == digest(again)
    assert truth.stored == truth2.stored and truth.rejected == truth2.rejected
    other, _ = plan(scenario.model_copy(update={"seed": 43}), ANCHOR)
    assert digest(other) != digest(messages)


def test_messages_are_in_sending_order_and_inside_the_run(planned):
    messages, truth = planned
    sends = [m.send_ms for m in messages]
    assert sends == sorted(sends)
    assert truth.messages == len(messages)


def test_each_fault_happens_at_its_declared_rate(scenario, planned):
    _, truth = planned
    f = scenario.faults
    n = truth.readings_generated
    (exp,) = truth.experiments
    assert n == sum(48 * 12 for _ in exp.devices)  # 2 days at 5 min, every device
    faults = truth.faults
    # an outage of 3 h on 10% of the devices: exact in readings, devices chosen by share
    assert faults["outage"] % 36 == 0 and within(faults["outage"] // 36, len(exp.devices), 0.1)
    after_outage = n - faults["outage"]
    assert within(faults["dropout"], after_outage, f.dropout.rate)
    sent_readings = after_outage - faults["dropout"]
    assert within(faults["malformed"] + faults["skipped_ambiguous"], sent_readings, f.malformed, 5)
    # duplicates, late and out-of-order delivery are drawn once per message formed from readings
    valid_messages = truth.messages - faults["duplicates"] - faults["malformed"]
    for name, rate in (("duplicates", f.duplicates), ("late", f.late.rate), ("out_of_order", f.out_of_order.rate)):
        assert within(faults[name], valid_messages, rate), (name, faults[name], valid_messages)
    skewed_devices = faults["clock_skew"] / (sent_readings / len(exp.devices))
    assert within(round(skewed_devices), len(exp.devices), f.clock_skew.devices)
    assert within(faults["bursts"], sent_readings, f.bursts.rate, 5)


def test_duplicates_count_once_in_the_truth(planned):
    messages, truth = planned
    payloads = Counter((m.topic, m.payload) for m in messages if m.fault != "malformed")
    assert any(c == 2 for c in payloads.values()), "the scenario sends some messages twice"
    stored_keys = [k for m in messages for k in ((d, me, ts) for d, me, ts, _ in m.stored)]
    assert len(set(stored_keys)) == len(truth.stored) == len(stored_keys)
    assert truth.rejected_by_reason()["duplicate"] > 0


def test_truth_matches_ingest_pipeline_message_by_message(scenario, planned):
    """Feed every message through ingest's pure pipeline (decode, authorise, seq memory) at
    the time it reaches ingest: what it forwards and refuses is exactly the ground truth."""
    messages, truth = planned
    run = Run(scenario, ANCHOR)
    registry = Registry.of(truth.experiments)
    limits = scenario.ingest.limits()
    memory = SeqMemory()
    stored: dict[tuple[str, str, int], float] = {}
    rejected: dict[str, tuple[str, Reason]] = {}
    for m in messages:
        now = receive_ms(m.send_ms, run.anchor_ms, run.speed)
        out = handle(m.topic, m.payload, now, registry, limits)
        screen_duplicates(out, memory, m.topic, m.payload)
        if out.batch is not None:
            remember(out, memory)
            for r in out.batch.readings:
                for metric, value in r.metrics.items():
                    stored[(out.batch.device_id, metric, r.ts_ms)] = value
        for rej in out.rejections:
            rejected[rej.rejection_id] = (rej.experiment_id, Reason(rej.reason))
    assert stored == truth.stored
    assert rejected == truth.rejected
    reasons = truth.rejected_by_reason()
    for reason in ("malformed_json", "wrong_type", "missing_field", "value_out_of_range", "timestamp_too_old",
                   "timestamp_in_future", "duplicate"):
        assert reasons[reason] > 0, reason


def test_verdicts_depend_on_speed_through_the_arrival_time(scenario):
    """Live, a clock 20 min fast is always refused as in the future; at ×2000 the arrival
    clock is far ahead of the readings, so only the last 20 minutes are refused."""
    small = parse_scenario(
        {
            "name": "skew",
            "duration": "2h",
            "experiments": [{"manifest": str(REPO / "control/examples/experiments/adaptive-lighting-borgo-po.yaml"),
                             "devices": {"treatment": 2, "control": 2}, "interval": "5m"}],
            "faults": {"clock_skew": {"devices": 1.0, "offset": "20m"}},
        }
    )
    _, live = plan(small, ANCHOR, speed=1)
    assert live.stored == {} and live.rejected_by_reason() == {"timestamp_in_future": 24 * 4}
    _, fast = plan(small, ANCHOR, speed=2000)
    rej = fast.rejected_by_reason()["timestamp_in_future"]
    assert 0 < rej < 24 * 4 and len(fast.stored) == (24 * 4 - rej - fast.faults["skipped_ambiguous"]) * 2


def test_plan_without_faults_stores_every_reading(scenario):
    clean = scenario.model_copy(update={"faults": type(scenario.faults)()})
    messages, truth = plan(clean, ANCHOR)
    assert truth.rejected == {} and truth.faults == Counter()
    assert len(truth.stored) == truth.readings_generated * 2  # energy and dimming
    assert len(messages) == truth.readings_generated
