"""The KPI engine, free of Faust: fold a batch of readings into event-time tumbling windows.

Windows are keyed by experiment, KPI, device group, window size and window start (all in
the reading's own time, ``ts``). ``apply_batch`` reads and writes window states through two
callables, so the same code runs on a dict in tests and on a Faust table in the worker.
Each update raises the window's revision; storage keeps the highest revision.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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
) -> list[KpiValue]:
    """Add the batch's readings to every KPI window they fall in; return the updated KPIs.

    A stored window maps KPI name → ``{"k": kind signature, "s": aggregator state, "n":
    samples, "r": revision}``. When a manifest update changes what a KPI computes, its window
    starts afresh (the revision keeps growing, so storage takes the new value). Impact KPIs
    have one window over the experiment's whole span, shared by both groups.
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
            state = window.get(kpi.name)
            if state is None or state.get("k") != sig:  # new, or its definition changed
                state = {"k": sig, "s": agg.initialize(), "n": 0, "r": state["r"] if state else 0}
            obs = kpis.Obs(value, reading.ts_ms, batch.device_id, group, batch.received_ms)
            window[kpi.name] = {"k": sig, "s": agg.add(state["s"], obs), "n": state["n"] + 1, "r": state["r"]}
            changed.add(kpi.name)
    by_name = {k.name: k for k in experiment.kpis}
    out = []
    for k, (key, window, changed) in touched.items():
        for name in sorted(changed):
            state = window[name]
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
        store(k, window)
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
