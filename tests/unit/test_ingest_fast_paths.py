"""Ingest's fast paths give what the plain code gives:

- ``decode.plain_reading`` (the common well-formed item in one pass) accepts only items that
  ``decode_item`` accepts, with an equal Reading, and leaves everything else to it;
- ``pipeline.screen_conflicts`` and ``remember`` decide every message (kept readings,
  refusals and their wording, tokens to wait for, exact repeats) as the code before them;
- ``decode.parse_topic`` through its per-topic cache parses as without it, and caches only
  topics short enough to be valid;
- ``dedup.ValueMemory`` (values and tokens in two maps, nothing per instant tracked by the
  cycle collector) answers every lookup as the plain one-tuple-per-instant memory it replaced,
  kept here as the reference model.
"""

from __future__ import annotations

import gc
import math
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.e2e.load import payload as load_payload
from ingest.decode import (
    _LONGEST_VALID_TOPIC,
    ItemError,
    TopicAddress,
    _parse_topic,
    _parse_topic_cached,
    decode,
    decode_item,
    parse_topic,
    plain_reading,
)
from ingest.dedup import SeqMemory, ValueMemory
from ingest.pipeline import (
    Conflicts,
    Outcome,
    _reject,
    handle,
    remember,
    screen_conflicts,
    screen_duplicates,
)
from pilotlab.contracts import Limits, Reading, Reason, from_ms, telemetry_topic
from pilotlab.manifest import load_manifests
from pilotlab.metrics import METRICS
from pilotlab.registry import Registry

NOW_MS = 1_773_576_000_000
LIMITS = Limits(max_age_ms=7 * 86_400_000, max_future_ms=300_000)

NAMES = [*sorted(METRICS)[:4], "PM2.5", "no_2", "bogus", ""]  # canonical, aliases, unknown
NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1e6, 2.5, 40.0, True, False, None, "3.5"]),
)
TS = st.one_of(
    st.integers(min_value=NOW_MS - 8 * 86_400_000, max_value=NOW_MS + 400_000),
    st.integers(min_value=-5, max_value=2 * 10**11),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["2026-03-15T12:00:00Z", "2026-03-15T12:00:00", "x", None, True, float(NOW_MS)]),
)
SEQ = st.one_of(st.integers(min_value=-3, max_value=2**64), st.sampled_from([True, 1.0, "1", None]))
METRIC_MAPS = st.one_of(
    st.dictionaries(st.sampled_from(NAMES), NUMBERS, max_size=5),
    st.sampled_from([[], None, "no2", 3]),
)


@st.composite
def items(draw) -> object:
    fields = {"seq": SEQ, "ts": TS, "metrics": METRIC_MAPS, "extra": st.integers()}
    item = {k: draw(v) for k, v in fields.items() if draw(st.booleans()) or k != "extra"}
    for k in ("seq", "ts", "metrics"):
        if draw(st.integers(0, 9)) == 0:
            item.pop(k)  # now and then a missing field
    return draw(st.sampled_from([item, item, item, [item], "item", 7]))


@settings(max_examples=3000, deadline=None)
@given(items())
def test_plain_reading_accepts_only_what_decode_item_accepts_with_the_same_reading(item) -> None:
    fast = plain_reading(item, NOW_MS, LIMITS)
    slow = decode_item(item, 0, NOW_MS, LIMITS)
    if fast is not None:
        assert isinstance(slow, Reading)
        assert fast == slow
        assert all(type(v) is float for v in fast.metrics.values())


def test_plain_reading_takes_the_benchmark_workload_and_the_common_shapes() -> None:
    """The fast path is not dead code: the e2e workload's items and integer values take it."""
    doc = orjson.loads(load_payload(0, NOW_MS - 1000, 10))
    assert all(plain_reading(item, NOW_MS, LIMITS) is not None for item in doc)
    assert plain_reading({"seq": 1, "ts": NOW_MS, "metrics": {"no2": 40}}, NOW_MS, LIMITS) == Reading(
        1, NOW_MS, {"no2": 40.0}
    )


def test_plain_reading_leaves_every_refusal_to_decode_item() -> None:
    base = {"seq": 1, "ts": NOW_MS, "metrics": {"no2": 40.0}}
    for change in (
        {"seq": -1},
        {"seq": True},
        {"ts": "2026-03-15T12:00:00Z"},  # valid, but ISO strings are decode_item's
        {"ts": 1_700_000_000},  # epoch seconds
        {"ts": NOW_MS + 301_000},
        {"ts": NOW_MS - 8 * 86_400_000},
        {"metrics": {}},
        {"metrics": {"NO2": 40.0}},  # an alias: canonical_metric's job
        {"metrics": {"no2": math.inf}},
        {"metrics": {"no2": math.nan}},
        {"metrics": {"no2": 1e12}},
        {"metrics": {"no2": 2**80}},
    ):
        assert plain_reading({**base, **change}, NOW_MS, LIMITS) is None, change


def test_decode_with_the_fast_path_matches_item_by_item_decoding() -> None:
    doc = [
        {"seq": 1, "ts": NOW_MS, "metrics": {"no2": 40.0}},
        {"seq": 2, "ts": NOW_MS, "metrics": {"NO2": 41.0}},
        {"seq": 3, "ts": "2026-03-15T12:00:00Z", "metrics": {"no2": 1e12}},
        {"seq": 4, "ts": NOW_MS, "metrics": {"no2": 40.0}, "note": "ignored"},
    ]
    out = decode(orjson.dumps(doc), NOW_MS, LIMITS)
    expected = [decode_item(item, i, NOW_MS, LIMITS) for i, item in enumerate(doc)]
    assert out.readings == [r for r in expected if isinstance(r, Reading)]
    assert out.errors == [e for e in expected if not isinstance(e, Reading)]
    assert out.indexes == [0, 1, 3]


class ReferenceValueMemory:
    """The memory before the fast paths: one (values, token) tuple per instant."""

    def __init__(self, per_device: int, max_devices: int) -> None:
        self.per_device, self.max_devices = per_device, max_devices
        self._devices: OrderedDict[str, OrderedDict[int, tuple[dict[str, float], object]]] = OrderedDict()

    def lookup(self, device: str, ts_ms: int):
        instants = self._devices.get(device)
        return None if instants is None else instants.get(ts_ms)

    def remember(self, device: str, ts_ms: int, metrics: dict[str, float], token: object = None) -> None:
        instants = self._devices.get(device)
        if instants is None:
            instants = self._devices[device] = OrderedDict()
            while len(self._devices) > self.max_devices:
                self._devices.popitem(last=False)
        else:
            self._devices.move_to_end(device)
        have = instants.get(ts_ms)
        if have is None:
            instants[ts_ms] = (dict(metrics), token)
            while len(instants) > self.per_device:
                instants.popitem(last=False)
        else:
            have[0].update(metrics)


OPS = st.lists(
    st.tuples(
        st.booleans(),  # remember (True) or lookup
        st.sampled_from(["a", "b", "c", "d"]),
        st.integers(0, 12),
        st.dictionaries(st.sampled_from(["no2", "pm25", "pm10"]), st.floats(0, 100), max_size=3),
        st.integers(0, 5),
    ),
    max_size=200,
)


@settings(max_examples=500, deadline=None)
@given(st.integers(1, 5), st.integers(1, 3), OPS)
def test_value_memory_answers_as_the_reference_model(per_device, max_devices, ops) -> None:
    fast, ref = ValueMemory(per_device, max_devices), ReferenceValueMemory(per_device, max_devices)
    for is_remember, device, ts, metrics, token in ops:
        if is_remember:
            fast.remember(device, ts, metrics, token)
            ref.remember(device, ts, metrics, token)
        assert fast.lookup(device, ts) == ref.lookup(device, ts)
    for device in "abcd":
        for ts in range(13):
            assert fast.lookup(device, ts) == ref.lookup(device, ts)


def test_value_memory_never_changes_a_readings_metrics() -> None:
    """It keeps a Reading's own dict (no copy), so a merge must make a new one."""
    memory, first, second = ValueMemory(), {"no2": 1.0}, {"pm25": 3.0}
    memory.remember("a", 1, first, "t")
    memory.remember("a", 1, second, "later")
    memory.remember("a", 1, {"no2": 9.0}, "later still")
    assert memory.lookup("a", 1) == ({"no2": 9.0, "pm25": 3.0}, "t")  # the first hand-off's token
    assert first == {"no2": 1.0} and second == {"pm25": 3.0}


def test_value_memory_creates_no_object_the_cycle_collector_tracks_per_instant() -> None:
    """Why the two maps: the remembered instants must not lengthen every full collection."""
    memory = ValueMemory(per_device=1000)

    class Token:  # tracked, like the service's _PendingAck
        pass

    token = Token()
    memory.remember("a", 0, {"no2": 1.0}, token)
    gc.collect()
    before = len(gc.get_objects())
    for ts in range(1, 1001):
        memory.remember("a", ts, {"no2": 1.0, "pm25": 2.0}, token)
    gc.collect()
    assert len(gc.get_objects()) - before < 10


# --- the whole screening against the code before the fast paths ----------------------------


def reference_screen_conflicts(out: Outcome, memory: ReferenceValueMemory, topic: str, payload: bytes) -> Conflicts:
    """``pipeline.screen_conflicts`` before the fast paths (a (ts, metric) key per value)."""
    found = Conflicts()
    if out.batch is None:
        return found
    device = out.batch.device_id
    here: dict[tuple[int, str], float] = {}
    keep: list[Reading] = []
    kept_indexes: list[int | None] = []
    indexes = out.indexes if len(out.indexes) == len(out.batch.readings) else [None] * len(out.batch.readings)
    changed = False
    for reading, index in zip(out.batch.readings, indexes, strict=True):
        earlier = memory.lookup(device, reading.ts_ms)
        fresh: dict[str, float] = {}
        clashes = []
        for metric, value in reading.metrics.items():
            prev = here.get((reading.ts_ms, metric))
            if prev is None and earlier is not None:
                prev = earlier[0].get(metric)
                if prev is not None and earlier[1] is not None:
                    found.tokens.append(earlier[1])
            if prev is None:
                fresh[metric] = value
                here[(reading.ts_ms, metric)] = value
            elif prev == value:
                found.repeats += 1
            else:
                clashes.append(f"{metric} {value!r} (accepted before: {prev!r})")
        if clashes:
            when = from_ms(reading.ts_ms).isoformat().replace("+00:00", "Z")
            detail = f"{device} at {when}: {', '.join(clashes)}; one value per metric and instant is kept"
            err = ItemError(Reason.CONFLICTING_READING, detail, index)
            out.rejections.append(_reject(err, topic, payload, out.batch.received_ms, out.address))
        if len(fresh) < len(reading.metrics):
            changed = True
            if not fresh:
                continue
            keep.append(Reading(reading.seq, reading.ts_ms, fresh))
        else:
            keep.append(reading)
        kept_indexes.append(index)
    if changed:
        out.indexes = kept_indexes if out.indexes else []
        out.batch = replace(out.batch, readings=tuple(keep)) if keep else None
    return found


def reference_remember(out: Outcome, memory: SeqMemory, token: object, values: ReferenceValueMemory) -> None:
    """``pipeline.remember`` before the fast paths (one call per reading and memory)."""
    if out.batch is None:
        return
    for reading in out.batch.readings:
        if not out.senml:
            memory.remember(out.batch.device_id, reading.seq, token)
        values.remember(out.batch.device_id, reading.ts_ms, reading.metrics, token)


REGISTRY = Registry.of(load_manifests(Path(__file__).resolve().parents[2] / "control" / "examples" / "experiments"))
DEVICES = [telemetry_topic("lez-san-salvario", d) for d in ("aq-lez-01", "aq-lez-02")]
SMALL = st.sampled_from([10.0, 11.0, 12.0])


@st.composite
def messages(draw) -> tuple[str, bytes]:
    """Native batches (and now and then SenML) with few seqs, instants and values, so that
    duplicates, conflicts, exact repeats and repeats within a message are frequent."""
    topic = draw(st.sampled_from(DEVICES))
    if draw(st.integers(0, 5)) == 0:
        base = NOW_MS / 1000
        pack = [{"bn": "urn:dev:x:", "bt": base}] + [
            {"n": draw(st.sampled_from(["no2", "pm25"])), "v": draw(SMALL), "t": draw(st.integers(-3, 0))}
            for _ in range(draw(st.integers(1, 4)))
        ]
        return topic, orjson.dumps(pack)
    items = [
        {
            "seq": draw(st.integers(0, 8)),
            "ts": NOW_MS - draw(st.integers(0, 4)),
            "metrics": draw(st.dictionaries(st.sampled_from(["no2", "pm25", "pm10"]), SMALL, min_size=1)),
        }
        for _ in range(draw(st.integers(1, 6)))
    ]
    return topic, orjson.dumps(items)


def screen(kind: str, state, topic: str, raw: bytes, token: str):
    seqs, values = state
    out = handle(topic, raw, NOW_MS, REGISTRY, LIMITS)
    originals = screen_duplicates(out, seqs, topic, raw)
    if kind == "fast":
        found = screen_conflicts(out, values, topic, raw)
        remember(out, seqs, token, values)
    else:
        found = reference_screen_conflicts(out, values, topic, raw)
        reference_remember(out, seqs, token, values)
    return out.batch, out.indexes, out.rejections, originals, found.tokens, found.repeats


@settings(max_examples=400, deadline=None)
@given(st.integers(1, 6), st.lists(messages(), min_size=1, max_size=12))
def test_screening_decides_every_message_as_the_code_before(instants, msgs) -> None:
    fast = (SeqMemory(per_device=6, max_devices=2), ValueMemory(per_device=instants, max_devices=2))
    ref = (SeqMemory(per_device=6, max_devices=2), ReferenceValueMemory(instants, 2))
    for i, (topic, raw) in enumerate(msgs):
        assert screen("fast", fast, topic, raw, f"hand-off {i}") == screen("ref", ref, topic, raw, f"hand-off {i}")


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.text(max_size=200),
        st.builds(
            "pilots/{}/{}/telemetry".format,
            st.from_regex(r"[a-z0-9][a-z0-9_-]{0,70}", fullmatch=True),
            st.from_regex(r"[a-zA-Z0-9_/-]{0,70}", fullmatch=True),
        ),
    )
)
def test_parse_topic_through_its_cache_is_the_plain_parse(topic) -> None:
    assert parse_topic(topic) == _parse_topic(topic)
    assert parse_topic(topic) == _parse_topic(topic)  # the second time from the cache


def test_only_topics_short_enough_to_be_valid_are_cached() -> None:
    longest = f"pilots/{'a' * 63}/{'b' * 63}/telemetry"
    assert isinstance(parse_topic(longest), TopicAddress)
    assert len(longest) == _LONGEST_VALID_TOPIC
    before = _parse_topic_cached.cache_info().currsize
    for i in range(50):
        parse_topic(f"pilots/{'x' * 5000}{i}/d/telemetry")
    assert _parse_topic_cached.cache_info().currsize == before
