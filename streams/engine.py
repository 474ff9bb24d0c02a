"""The KPI engine, free of Faust: fold a batch of readings into event-time tumbling windows.

Windows are keyed by experiment, KPI, device group, window size and window start (all in
the reading's own time, ``ts``). ``apply_batch`` reads and writes window states through two
callables, so the same code runs on a dict in tests and on a Faust table in the worker.
Each update raises the window's revision; storage keeps the highest revision.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import orjson

from pilotlab.contracts import DeviceStatus, KpiValue, Reading, ReadingBatch
from pilotlab.manifest import Experiment
from streams import kpis

WindowState = dict  # {"s": aggregator state, "n": samples, "r": revision}


def window_start(ts_ms: int, size_s: int) -> int:
    size_ms = size_s * 1000
    return ts_ms - ts_ms % size_ms


@dataclass(frozen=True, slots=True)
class WindowKey:
    """One stored window: every KPI of an experiment group with the same window size shares
    it, so a batch updates one table entry per window rather than one per KPI."""

    experiment_id: str
    device_group: str
    window_size_s: int
    window_start_ms: int

    def encode(self) -> str:
        return f"{self.experiment_id}|{self.device_group}|{self.window_size_s}|{self.window_start_ms}"


_MADE: dict[tuple[str, int], tuple[Experiment, dict]] = {}


def aggregators_of(experiment: Experiment) -> dict:
    """KPI name → aggregator, built once per registry snapshot of the experiment."""
    key = (experiment.id, id(experiment))
    hit = _MADE.get(key)
    if hit is None or hit[0] is not experiment:
        if len(_MADE) > 256:
            _MADE.clear()
        hit = (experiment, {k.name: kpis.make(k, experiment) for k in experiment.kpis})
        _MADE[key] = hit
    return hit[1]


IMPACT_GROUP = "all"  # impact KPIs span both groups


def apply_batch(
    batch: ReadingBatch,
    experiment: Experiment,
    load: Callable[[str], dict[str, WindowState] | None],
    store: Callable[[str, dict[str, WindowState]], None],
    source: list[int] | None = None,
) -> list[KpiValue]:
    """Add the batch's readings to every KPI window they fall in; return the updated KPIs.

    A stored window maps KPI name → ``{"k": kind signature, "s": aggregator state, "n":
    samples, "r": revision}``. When a manifest update changes what a KPI computes, its window
    starts afresh (the revision keeps growing, so storage takes the new value). Impact KPIs
    have one window over the experiment's whole span, shared by both groups.

    ``source`` ([partition, offset] of the Kafka message) is recorded in each window it
    updates (key ``"_o"``): a window already holding this message's readings (a replay after
    a crash cut the message's state writes short) is not added to again, only re-emitted.
    """
    aggs = aggregators_of(experiment)
    touched: dict[str, tuple[WindowKey, dict[str, WindowState], set[str]]] = {}
    exp_id, group = batch.experiment_id, batch.group
    for kpi in experiment.kpis:
        agg = aggs[kpi.name]
        sig = kpi.signature()
        impact = kpi.kind == "impact"
        for reading in batch.readings:
            value = reading.metrics.get(kpi.metric)
            if value is None:
                continue
            if impact:
                if agg.period(reading.ts_ms) is None:
                    continue
                k = f"{exp_id}|{IMPACT_GROUP}|{agg.window_size_s}|{agg.window_start_ms}"
                if k not in touched:
                    key = WindowKey(exp_id, IMPACT_GROUP, agg.window_size_s, agg.window_start_ms)
                    touched[k] = (key, dict(load(k) or {}), set())
            else:
                start = window_start(reading.ts_ms, kpi.window)
                k = f"{exp_id}|{group}|{kpi.window}|{start}"
                if k not in touched:
                    touched[k] = (WindowKey(exp_id, group, kpi.window, start), dict(load(k) or {}), set())
            _, window, changed = touched[k]
            if source is not None and window.get("_o") == source:
                changed.add(kpi.name)  # applied before the crash: re-emit as it stands
                continue
            state = window.get(kpi.name)
            if state is None or state.get("k") != sig:  # new, or its definition changed
                state = {"k": sig, "s": agg.initialize(), "n": 0, "r": state["r"] if state else 0}
            obs = kpis.Obs(value, reading.ts_ms, batch.device_id, group, batch.received_ms)
            window[kpi.name] = {"k": sig, "s": agg.add(state["s"], obs), "n": state["n"] + 1, "r": state["r"]}
            changed.add(kpi.name)
    by_name = {k.name: k for k in experiment.kpis}
    out = []
    for k, (key, window, changed) in touched.items():
        replayed = source is not None and window.get("_o") == source
        for name in sorted(changed):
            if name not in window:  # the manifest changed between the crash and the replay
                continue
            state = window[name]
            if not replayed:
                state["r"] += 1
            kpi = by_name[name]
            value, details = aggs[name].result(state["s"], key.device_group)
            out.append(
                KpiValue(
                    experiment_id=key.experiment_id,
                    kpi=name,
                    metric=kpi.metric,
                    kind=kpi.kind,
                    device_group=key.device_group,
                    window_size_s=key.window_size_s,
                    window_start_ms=key.window_start_ms,
                    value=value,
                    sample_count=state["n"],
                    revision=state["r"],
                    details=details,
                )
            )
        if not replayed:
            if source is not None:
                window["_o"] = source
            store(k, window)
    return out


def current_kpis(
    batch: ReadingBatch, experiment: Experiment, load: Callable[[str], dict[str, WindowState] | None]
) -> list[KpiValue]:
    """The KPIs of every window this batch's readings fall in, as they stand (no update):
    re-emitted when a message that was fully applied before a crash is delivered again, in
    case its KPI records had not reached the broker (storage keeps the highest revision)."""
    aggs = aggregators_of(experiment)
    seen: set[tuple[str, str]] = set()
    out = []
    for kpi in experiment.kpis:
        agg = aggs[kpi.name]
        for reading in batch.readings:
            if kpi.metric not in reading.metrics:
                continue
            if kpi.kind == "impact":
                if agg.period(reading.ts_ms) is None:
                    continue
                key = WindowKey(batch.experiment_id, IMPACT_GROUP, agg.window_size_s, agg.window_start_ms)
            else:
                key = WindowKey(batch.experiment_id, batch.group, kpi.window, window_start(reading.ts_ms, kpi.window))
            k = key.encode()
            if (k, kpi.name) in seen:
                continue
            seen.add((k, kpi.name))
            state = (load(k) or {}).get(kpi.name)
            if state is None or state.get("k") != kpi.signature():
                continue
            value, details = agg.result(state["s"], key.device_group)
            out.append(
                KpiValue(
                    experiment_id=key.experiment_id,
                    kpi=kpi.name,
                    metric=kpi.metric,
                    kind=kpi.kind,
                    device_group=key.device_group,
                    window_size_s=key.window_size_s,
                    window_start_ms=key.window_start_ms,
                    value=value,
                    sample_count=state["n"],
                    revision=state["r"],
                    details=details,
                )
            )
    return out


# --- event time: allowed lateness and device liveness ------------------------------------------


def closes_at(reading: Reading, experiment: Experiment) -> int:
    """Event time after which this reading is late: the end of the shortest KPI window it
    falls in, plus the experiment's allowed lateness (readings feeding only impact KPIs:
    their own ``ts`` plus the lateness)."""
    lateness_ms = experiment.lateness * 1000
    ends = [
        window_start(reading.ts_ms, k.window) + k.window * 1000
        for k in experiment.kpis
        if k.kind != "impact" and k.metric in reading.metrics
    ]
    return (min(ends) if ends else reading.ts_ms) + lateness_ms


def split_late(
    batch: ReadingBatch, experiment: Experiment, watermark_ms: int | None
) -> tuple[ReadingBatch, tuple[Reading, ...]]:
    """Readings still within lateness (they revise their windows) and readings past it.
    ``watermark_ms`` is the newest ``ts`` of the experiment seen before this batch."""
    if watermark_ms is None:
        return batch, ()
    on_time, late = [], []
    for r in batch.readings:
        (late if closes_at(r, experiment) <= watermark_ms else on_time).append(r)
    if not late:
        return batch, ()
    kept = ReadingBatch(batch.experiment_id, batch.device_id, batch.group, batch.received_ms, tuple(on_time))
    return kept, tuple(late)


def advance(
    state: dict | None, batch: ReadingBatch, experiment: Experiment
) -> tuple[dict, list[DeviceStatus]]:
    """Move the experiment's event-time state on by one (screened) batch.

    State: ``{"wm": newest ts seen, "dev": {device: [last ts seen, "online"|"offline"]}}``.
    A device seen again after being offline is reported online at that reading's ``ts``; any
    online device whose last reading is ``offline_after`` of its intervals behind the
    watermark is reported offline at ``last + offline_after · interval``. Liveness runs in
    event time, so replays and out-of-order delivery give the same transitions."""
    st = state or {"wm": None, "dev": {}}
    wm = st["wm"]
    devices = {d: list(v) for d, v in st["dev"].items()}
    events: list[DeviceStatus] = []
    if batch.readings:
        newest = max(r.ts_ms for r in batch.readings)
        last, status = devices.get(batch.device_id, [None, None])
        if status == "offline" and newest > last:
            events.append(
                DeviceStatus(batch.experiment_id, batch.device_id, "online", newest, last, "reporting again")
            )
            status = "online"
        devices[batch.device_id] = [newest if last is None else max(last, newest), status or "online"]
        wm = newest if wm is None else max(wm, newest)
    if wm is not None:
        for device_id in sorted(devices):
            last, status = devices[device_id]
            device = experiment.device(device_id)
            if status != "online" or device is None:
                continue
            silent_at = last + experiment.offline_after * device.interval * 1000
            if silent_at <= wm:
                devices[device_id] = [last, "offline"]
                events.append(
                    DeviceStatus(
                        batch.experiment_id,
                        device_id,
                        "offline",
                        silent_at,
                        last,
                        f"silent for {experiment.offline_after} expected intervals of {device.interval} s",
                    )
                )
    return {"wm": wm, "dev": devices}, events


@dataclass(frozen=True, slots=True)
class Screened:
    """A batch after de-duplication: what to count, and what was held back and why."""

    fresh: ReadingBatch
    duplicates: int
    too_late: tuple[Reading, ...]


def screen(batch: ReadingBatch, seen: dict | None, horizon_ms: int) -> tuple[Screened, dict]:
    """Drop readings already counted (same device, metric and ``ts``: the natural key storage
    uses too) and hold back readings older than the device's newest ``ts`` minus the horizon,
    which can no longer be told apart from a duplicate. ``seen`` is the device's state:
    ``{"hwm": newest ts, "seen": {ts: [metrics]}}``, pruned to the horizon so it stays small."""
    state = seen or {"hwm": None, "seen": {}}
    hwm = state["hwm"]
    known: dict[str, list[str]] = dict(state["seen"])
    fresh: list[Reading] = []
    late: list[Reading] = []
    duplicates = 0
    for r in batch.readings:
        if hwm is not None and r.ts_ms <= hwm - horizon_ms:
            late.append(r)
            continue
        key = str(r.ts_ms)
        already = known.get(key, [])
        new_metrics = {m: v for m, v in r.metrics.items() if m not in already}
        duplicates += len(r.metrics) - len(new_metrics)
        if not new_metrics:
            continue
        known[key] = [*already, *new_metrics]
        fresh.append(Reading(r.seq, r.ts_ms, new_metrics))
        hwm = r.ts_ms if hwm is None else max(hwm, r.ts_ms)
    if hwm is not None:
        floor = hwm - horizon_ms
        known = {k: v for k, v in known.items() if int(k) > floor}
    screened = Screened(
        fresh=ReadingBatch(
            batch.experiment_id, batch.device_id, batch.group, batch.received_ms, tuple(fresh)
        ),
        duplicates=duplicates,
        too_late=tuple(late),
    )
    return screened, {"hwm": hwm, "seen": known}


# --- replays after a crash -------------------------------------------------------------------
#
# The worker keeps every state in one Faust table, so all the writes one message causes go to
# one changelog partition, in order: de-duplication, windows, experiment clock, and last the
# applied-offset mark. A crash keeps a prefix of them. The functions below let a replayed
# message find what of it was already written and neither add it twice nor lose it: each state
# records the source message ([partition, offset]) that last changed it, with what that
# message did to it.


def screen_once(
    batch: ReadingBatch, seen: dict | None, horizon_ms: int, source: list[int]
) -> tuple[Screened, dict]:
    """``screen``, remembering its outcome for ``source``: screening the same message again
    (a replay) gives the same outcome instead of calling its readings duplicates."""
    fx = (seen or {}).get("fx")
    if fx is not None and fx["o"] == source:
        def readings(rows):
            return tuple(Reading(seq, ts, metrics) for seq, ts, metrics in rows)

        fresh = ReadingBatch(
            batch.experiment_id, batch.device_id, batch.group, batch.received_ms, readings(fx["f"])
        )
        return Screened(fresh=fresh, duplicates=fx["d"], too_late=readings(fx["l"])), seen
    screened, state = screen(batch, seen, horizon_ms)
    state["fx"] = {
        "o": source,
        "f": [[r.seq, r.ts_ms, r.metrics] for r in screened.fresh.readings],
        "l": [[r.seq, r.ts_ms, r.metrics] for r in screened.too_late],
        "d": screened.duplicates,
    }
    return screened, state


def watermark_before(clock: dict | None, source: list[int]) -> int | None:
    """The experiment's watermark as it was before ``source`` was applied."""
    if clock is None:
        return None
    return clock["wb"] if clock.get("o") == source else clock["wm"]


def advance_once(
    clock: dict | None, batch: ReadingBatch, experiment: Experiment, source: list[int]
) -> tuple[dict, list[DeviceStatus]]:
    """``advance``, once per source message: a replay returns the same state and the same
    transitions (to send again; storage keys them on device, time and status)."""
    if clock is not None and clock.get("o") == source:
        return clock, [DeviceStatus(**e) for e in clock["ev"]]
    state, events = advance(clock, batch, experiment)
    state.update(
        o=source,
        wb=clock["wm"] if clock else None,
        ev=[orjson.loads(e.to_json()) for e in events],
    )
    return state, events


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one message makes the worker send."""

    kpis: list[KpiValue]
    late: tuple[Reading, ...]
    transitions: list[DeviceStatus]


def process(
    batch: ReadingBatch,
    experiment: Experiment,
    get: Callable[[str], object],
    put: Callable[[str, object], None],
    *,
    source: list[int],
    horizon_ms: int,
) -> Outcome:
    """One Kafka message through the whole engine, on one key-value state (the worker's
    Faust table). Writes, in this order: the device's de-duplication state ``d|device``, the
    windows ``w|window``, the experiment clock ``x|experiment``, and last the applied mark
    ``a|partition``. After a crash that kept any prefix of these writes, processing the same
    message again leaves the same state and sends the same records as one clean run."""
    partition, offset = source
    mark = f"a|{partition}"
    done = get(mark)

    def load_window(k: str):
        return get("w|" + k)

    def store_window(k: str, window: dict) -> None:
        put("w|" + k, window)

    if done is not None and offset < done:
        # fully applied before: count nothing, send its windows' KPIs again as they stand
        return Outcome(current_kpis(batch, experiment, load_window), (), [])
    device_key, clock_key = f"d|{batch.device_id}", f"x|{batch.experiment_id}"
    screened, seen = screen_once(batch, get(device_key), horizon_ms, source)
    put(device_key, seen)
    clock = get(clock_key)
    on_time, past_lateness = split_late(screened.fresh, experiment, watermark_before(clock, source))
    updates = apply_batch(on_time, experiment, load_window, store_window, source)
    clock, transitions = advance_once(clock, screened.fresh, experiment, source)
    put(clock_key, clock)
    put(mark, offset + 1)
    return Outcome(updates, (*screened.too_late, *past_lateness), transitions)
