"""The pure alert rules engine (streams/alerts.py) on plain lists: each kind's firing and
resolving, table-driven; event-time determinism (any arrival order within grace, any cut into
calls, replays) with hypothesis; the offline rule's default equals the streams worker's
liveness transitions."""

from __future__ import annotations

import copy
import random

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pilotlab.contracts import Reading, ReadingBatch
from pilotlab.manifest import AlertRule, Experiment
from streams.alerts import KpiWindow, Readings, Refused, alert_id, evaluate, firing, new_state
from streams.engine import FIRST_REPORT, advance

S = 1000
MIN = 60 * S
T0 = 1_772_409_600_000  # 2026-03-02T00:00:00Z, a whole hour


def experiment(**extra) -> Experiment:
    doc = {
        "id": "al",
        "title": "t",
        "startup": "s",
        "district": "d",
        "location": {"lat": 45.0, "lon": 7.6},
        "periods": {
            "baseline": {"start": "2026-03-02T00:00:00Z", "end": "2026-03-02T01:00:00Z"},
            "intervention": {"start": "2026-03-02T01:00:00Z", "end": "2026-03-02T02:00:00Z"},
        },
        "devices": [
            {"id": "d1", "kind": "air_quality", "group": "treatment", "interval": "1m"},
            {"id": "d2", "kind": "air_quality", "group": "treatment", "interval": "1m"},
            {"id": "d3", "kind": "air_quality", "group": "control", "interval": "1m"},
        ],
        "offline_after": 3,
        "kpis": [{"name": "no2_mean", "metric": "no2", "kind": "mean", "window": "1m"}],
    }
    doc.update(extra)
    return Experiment.model_validate(doc)


def rule(**kw) -> AlertRule:
    return AlertRule.model_validate({"name": "r", "grace": 0, **kw})


def run(exp: Experiment, rules: list[AlertRule], calls: list[list], state: dict | None = None):
    """Each call's events through evaluate; all transitions, and the last state."""
    out = []
    for events in calls:
        transitions, state = evaluate(state, events, exp, rules)
        out.extend(transitions)
    return out, state


def brief(transitions) -> list[tuple]:
    return [(t.rule, t.subject, t.status, t.fired_at_ms, t.at_ms) for t in transitions]


def tick(ts: int, *devices: str) -> list[Readings]:
    return [Readings(d, (ts,), ts + 500) for d in devices]


def steady(first_min: int, last_min: int, device: str = "d1") -> list[list[Readings]]:
    """A device reporting every minute: one call per reading."""
    return [tick(T0 + i * MIN, device) for i in range(first_min, last_min + 1)]


# --- device_offline ---------------------------------------------------------------------------


def test_a_silent_device_fires_after_the_threshold_and_resolves_when_it_reports() -> None:
    exp, r = experiment(), rule(kind="device_offline", after="5m")
    calls = [tick(T0 + i * MIN, "d1", "d2") for i in range(3)]  # both report until +2 min
    calls += [tick(T0 + i * MIN, "d1") for i in range(3, 8)]  # d2 silent; d1 to +7 min
    out, state = run(exp, [r], calls)
    assert brief(out) == [("r", "d2", "firing", T0 + 7 * MIN, T0 + 7 * MIN)]
    assert out[0].device_id == "d2" and out[0].value == 300 and "silent for 5 min" in out[0].summary
    assert firing(state) == [("r", "d2", T0 + 7 * MIN)]
    again, state = run(exp, [r], [tick(T0 + 9 * MIN, "d1", "d2")], state)
    assert brief(again) == [("r", "d2", "resolved", T0 + 7 * MIN, T0 + 9 * MIN)]
    assert again[0].value == 420  # silent 7 min in all
    assert firing(state) == []


@pytest.mark.parametrize(
    ("after", "gap_min", "fires"),
    [("5m", 5, False), ("5m", 6, True), ("10m", 6, False), (None, 3, False), (None, 4, True)],
)
def test_offline_threshold_table(after, gap_min, fires) -> None:
    """A gap between two readings longer than ``after`` (default offline_after 3 × 1 min)
    fires and resolves; one of exactly ``after`` does not."""
    r = rule(kind="device_offline", **({"after": after} if after else {}))
    calls = [tick(T0, "d1"), tick(T0 + gap_min * MIN, "d1")]
    out, _ = run(experiment(), [r], calls)
    assert [t.status for t in out] == (["firing", "resolved"] if fires else [])


def test_a_device_that_never_reported_is_not_judged_and_devices_narrow_the_scope() -> None:
    r = rule(kind="device_offline", after="2m", devices=["d2"])
    out, _ = run(experiment(), [r], [tick(T0, "d1", "d2"), tick(T0 + 10 * MIN, "d3")])
    assert [t.subject for t in out] == ["d2"]


def test_grace_delays_the_judgement_not_the_event_time() -> None:
    exp = experiment()
    calls = [tick(T0, "d1", "d2")] + [tick(T0 + i * MIN, "d1") for i in range(1, 7)]
    without, _ = run(exp, [rule(kind="device_offline", after="5m")], calls)
    held, state = run(exp, [rule(kind="device_offline", after="5m", grace="2m")], calls)
    assert [t.at_ms for t in without] == [T0 + 5 * MIN]
    assert held == []  # settled point: +4 min
    late, _ = run(exp, [rule(kind="device_offline", after="5m", grace="2m")], [tick(T0 + 7 * MIN, "d1")], state)
    assert [(t.status, t.at_ms) for t in late] == [("firing", T0 + 5 * MIN)]


def test_a_reading_later_than_grace_still_resolves_but_never_before_the_firing() -> None:
    exp, r = experiment(), rule(kind="device_offline", after="5m")
    out, state = run(exp, [r], [tick(T0, "d1", "d2"), *steady(1, 10)])
    assert [(t.status, t.at_ms) for t in out] == [("firing", T0 + 5 * MIN)]
    # d2's reading of +3 min arrives now: it was not silent that long, but the alert stays
    late, state = run(exp, [r], [tick(T0 + 3 * MIN, "d2")], state)
    assert late == [] and firing(state) == [("r", "d2", T0 + 5 * MIN)]
    late, state = run(exp, [r], [tick(T0 + 6 * MIN, "d2")], state)
    assert [(t.status, t.at_ms) for t in late] == [("resolved", T0 + 6 * MIN)]


def test_default_offline_rule_equals_the_streams_worker_liveness() -> None:
    """With after unset and no grace, the transitions are streams.engine.advance's."""
    exp, r = experiment(), rule(kind="device_offline")
    rng = random.Random(5)
    clock, state, ours, theirs = None, None, [], []
    for i in range(400):
        device = rng.choice(["d1", "d2", "d3"]) if rng.random() < 0.7 else "d1"
        ts = T0 + i * 20 * S
        if device == "d2" and 100 < i < 160:
            continue  # a long outage
        batch = ReadingBatch("al", device, exp.device(device).group, ts, (Reading(i, ts, {"no2": 1.0}),))
        clock, statuses = advance(clock, batch, exp)
        theirs += [
            (s.device_id, "firing" if s.status == "offline" else "resolved", s.ts_ms)
            for s in statuses
            if s.detail != FIRST_REPORT  # a device's first report resolves nothing
        ]
        transitions, state = evaluate(state, [Readings(device, (ts,), ts)], exp, [r])
        ours += [(t.subject, t.status, t.at_ms) for t in transitions]
    assert sorted(ours, key=lambda t: (t[2], t[0])) == sorted(theirs, key=lambda t: (t[2], t[0]))
    assert len(ours) > 4


# --- completeness_below ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("per_window", "threshold", "statuses"),
    [
        ([10, 10, 10], 0.8, []),
        ([10, 7, 10], 0.8, ["firing", "resolved"]),
        ([10, 8, 10], 0.8, []),  # 8 of 10 is not below 80%
        ([10, 0, 0, 10], 0.5, ["firing", "resolved"]),
        ([5, 5], 0.6, ["firing"]),
    ],
)
def test_completeness_table(per_window, threshold, statuses) -> None:
    """10-minute windows of a 1-minute device: 10 readings expected in each."""
    exp, r = experiment(), rule(kind="completeness_below", window="10m", threshold=threshold)
    calls = []
    for w, n in enumerate(per_window):
        calls += [tick(T0 + w * 10 * MIN + i * MIN, "d1") for i in range(n)]
    calls.append(tick(T0 + len(per_window) * 10 * MIN, "d2"))  # the watermark closes the last window
    out, _ = run(exp, [r], calls)
    assert [t.status for t in out] == statuses
    if statuses:
        bad = next(w for w, n in enumerate(per_window) if n / 10 < threshold)
        assert out[0].at_ms == T0 + (bad + 1) * 10 * MIN
        assert out[0].value == per_window[bad] / 10


def test_completeness_judges_from_the_first_whole_window() -> None:
    exp, r = experiment(), rule(kind="completeness_below", window="10m", threshold=0.9)
    calls = [tick(T0 + 5 * MIN + i * MIN, "d1") for i in range(15)] + [tick(T0 + 20 * MIN, "d2")]
    out, _ = run(exp, [r], calls)
    assert out == []  # the half window it started in is not judged


def test_a_window_shorter_than_a_device_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="shorter than the interval of d1, d2, d3"):
        experiment(alerts=[{"name": "c", "kind": "completeness_below", "window": "30s", "threshold": 0.5}])


# --- rejection_rate_above ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accepted", "refused", "min_count", "statuses"),
    [(10, 0, 10, []), (5, 5, 10, ["firing"]), (8, 2, 10, []), (3, 3, 10, []), (0, 3, 3, ["firing"])],
)
def test_rejection_rate_table(accepted, refused, min_count, statuses) -> None:
    """One 15-minute window of ingest time; threshold 20% (above, not at)."""
    exp, r = experiment(), rule(kind="rejection_rate_above", threshold=0.2, min_count=min_count)
    events = [Readings("d1", (T0 + i * S,), T0 + i * S) for i in range(accepted)]
    events += [Refused("d1", T0 + i * S, "wrong_type") for i in range(refused)]
    out, _ = run(exp, [r], [events, [Readings("d2", (T0 + 15 * MIN,), T0 + 15 * MIN)]])
    assert [t.status for t in out] == statuses


def test_rejection_rate_resolves_and_filters_reasons() -> None:
    exp = experiment()
    r = rule(kind="rejection_rate_above", threshold=0.2, window="1m", min_count=4, reasons=["malformed_json"])
    bad = [Refused("d1", T0 + i * S, "malformed_json") for i in range(4)] + [Refused("d1", T0, "duplicate")] * 9
    good = [Readings("d1", (T0 + MIN + i * S,), T0 + MIN + i * S) for i in range(4)]
    out, _ = run(exp, [r], [bad, good, [Readings("d2", (T0,), T0 + 2 * MIN)]])
    assert [(t.status, t.at_ms, t.value) for t in out] == [("firing", T0 + MIN, 1.0), ("resolved", T0 + 2 * MIN, 0.0)]


# --- kpi_above / kpi_below ---------------------------------------------------------------------


def kpi(start_min: int, value: float | None, group: str = "treatment", revision: int = 1) -> KpiWindow:
    return KpiWindow("no2_mean", group, T0 + start_min * MIN, 60, value, revision)


@pytest.mark.parametrize(
    ("kind", "values", "statuses"),
    [
        ("kpi_above", [30, 45, 50, 35], ["firing", "resolved"]),
        ("kpi_above", [30, 40, 35], []),
        ("kpi_below", [30, 10, None, 25], ["firing", "resolved"]),
    ],
)
def test_kpi_threshold_table(kind, values, statuses) -> None:
    """Threshold 40 (above) or 20 (below); a window is judged once a later one is seen."""
    r = rule(kind=kind, kpi="no2_mean", threshold=40 if kind == "kpi_above" else 20)
    calls = [[kpi(i, v)] for i, v in enumerate(values)] + [[kpi(len(values), None)]]
    out, _ = run(experiment(), [r], calls)
    assert [t.status for t in out] == statuses
    assert all(t.subject == "no2_mean:treatment" and t.device_id is None for t in out)


def test_the_newest_revision_is_judged_and_groups_apart() -> None:
    r = rule(kind="kpi_above", kpi="no2_mean", threshold=40)
    calls = [
        [kpi(0, 50, revision=1), kpi(0, 30, revision=3), kpi(0, 60, revision=2), kpi(0, 45, "control")],
        [kpi(1, 10), kpi(1, 10, "control")],
    ]
    out, _ = run(experiment(), [r], calls)
    assert [(t.subject, t.status, t.value) for t in out] == [("no2_mean:control", "firing", 45)]


def test_kpi_rules_need_a_windowed_kpi_of_the_experiment() -> None:
    with pytest.raises(ValueError, match="no KPI named 'nope'"):
        experiment(alerts=[{"name": "k", "kind": "kpi_above", "kpi": "nope", "threshold": 1}])


# --- rule changes, ids, state ------------------------------------------------------------------


def test_a_removed_or_changed_rule_resolves_what_it_had_firing() -> None:
    exp = experiment()
    r = rule(kind="device_offline", after="2m")
    _, state = run(exp, [r], [tick(T0, "d1", "d2"), *steady(1, 5)])
    assert firing(state) == [("r", "d2", T0 + 2 * MIN)]
    out, after_removal = evaluate(state, [], exp, [])
    assert [(t.status, t.summary, t.at_ms) for t in out] == [("resolved", "rule removed", T0 + 5 * MIN)]
    assert after_removal["r"] == {}
    # changed: resolved, and judged again with what the rule knew (the devices' last readings)
    out, _ = evaluate(state, [], exp, [rule(kind="device_offline", after="3m")])
    assert [(t.status, t.fired_at_ms) for t in out] == [("resolved", T0 + 2 * MIN), ("firing", T0 + 3 * MIN)]


def test_evaluate_leaves_its_input_state_alone_and_states_are_json() -> None:
    exp, r = experiment(), rule(kind="device_offline", after="2m")
    _, state = run(exp, [r], [tick(T0, "d1", "d2")])
    before = copy.deepcopy(state)
    evaluate(state, tick(T0 + 5 * MIN, "d1"), exp, [r])
    assert state == before
    assert orjson.loads(orjson.dumps(state)) == state


def test_the_alert_id_is_the_natural_key_hashed() -> None:
    exp, r = experiment(), rule(kind="device_offline", after="2m")
    out, _ = run(exp, [r], [tick(T0, "d1", "d2"), *steady(1, 5)])
    assert out[0].alert_id == alert_id("al", "r", "d2", T0 + 2 * MIN)
    assert len({alert_id("al", "r", "d2", T0), alert_id("al", "r", "d", T0), alert_id("al", "rd", "2", T0)}) == 3


# --- event time: any order within grace, any cut, replays ---------------------------------------

RULES = [
    AlertRule(name="off", kind="device_offline", after=4 * 60, grace=120),
    AlertRule(name="comp", kind="completeness_below", window=600, threshold=0.7, grace=120),
    AlertRule(name="rej", kind="rejection_rate_above", threshold=0.3, window=300, min_count=3, grace=120),
    AlertRule(name="hot", kind="kpi_above", kpi="no2_mean", threshold=40, grace=120),
]


@st.composite
def streams_of_events(draw):
    """A pilot's events in event-time order (ts, event), with outages, refusals and KPIs."""
    n = draw(st.integers(20, 120))
    out = []
    for i in range(n):
        ts = T0 + i * 30 * S
        for device in ("d1", "d2", "d3"):
            if draw(st.floats(0, 1)) < 0.25:
                continue  # dropped
            if draw(st.booleans()) and draw(st.floats(0, 1)) < 0.3:
                out.append((ts, Refused(device, ts, "wrong_type")))
            else:
                out.append((ts, Readings(device, (ts,), ts)))
        if i % 2 == 0:
            value = draw(st.sampled_from([None, 20.0, 45.0]))
            out.append((ts, KpiWindow("no2_mean", "treatment", ts - ts % MIN, 60, value, draw(st.integers(1, 3)))))
    return out


@settings(max_examples=60, deadline=None)
@given(stream=streams_of_events(), data=st.data())
def test_any_arrival_order_within_grace_and_any_cut_give_the_same_transitions(stream, data) -> None:
    exp = experiment()
    reference, ref_state = run(exp, RULES, [[e] for _, e in stream])
    # each event delayed by less than grace (120 s) behind its event time, then cut anywhere
    delays = data.draw(st.lists(st.integers(0, 119_000), min_size=len(stream), max_size=len(stream)))
    arrival = [
        e
        for _, _, e in sorted(
            ((ts + d, i, e) for (ts, e), d, i in zip(stream, delays, range(len(stream)), strict=True)),
            key=lambda x: (x[0], x[1]),
        )
    ]
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(arrival) - 1)), max_size=12)))
    calls = [arrival[a:b] for a, b in zip([0, *cuts], [*cuts, len(arrival)], strict=False) if a < b]
    got, state = run(exp, RULES, calls)
    assert sorted(brief(got)) == sorted(brief(reference))
    assert firing(state) == firing(ref_state)
    # a replay of the same calls from the same start state gives the same transitions again
    again, _ = run(exp, RULES, calls)
    assert brief(again) == brief(got)


@settings(max_examples=30, deadline=None)
@given(stream=streams_of_events())
def test_the_state_is_json_between_any_two_calls(stream) -> None:
    exp = experiment()
    direct, _ = run(exp, RULES, [[e for _, e in stream]])
    state, through_json = new_state(), []
    for _, e in stream:
        transitions, state = evaluate(state, [e], exp, RULES)
        state = orjson.loads(orjson.dumps(state))
        through_json.extend(transitions)
    assert sorted(brief(through_json)) == sorted(brief(direct))
