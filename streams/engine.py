"""The KPI engine, free of Faust: fold a batch of readings into event-time tumbling windows.

Windows are keyed by experiment, KPI, device group, window size and window start (all in
the reading's own time, ``ts``). ``apply_batch`` reads and writes window states through two
callables, so the same code runs on a dict in tests and on a Faust table in the worker.
Each update raises the window's revision; storage keeps the highest revision.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pilotlab.contracts import KpiValue, Reading, ReadingBatch
from pilotlab.manifest import Experiment
from streams.aggregators import AGGREGATORS

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


def apply_batch(
    batch: ReadingBatch,
    experiment: Experiment,
    load: Callable[[str], dict[str, WindowState] | None],
    store: Callable[[str, dict[str, WindowState]], None],
) -> list[KpiValue]:
    """Add the batch's readings to every KPI window they fall in; return the updated KPIs.

    A stored window maps KPI name → ``{"k": kind, "s": aggregator state, "n": samples,
    "r": revision}``. When a manifest update changes a KPI's kind, its window starts afresh
    (the revision keeps growing, so storage takes the new value).
    """
    touched: dict[str, tuple[WindowKey, dict[str, WindowState], set[str]]] = {}
    for kpi in experiment.kpis:
        agg = AGGREGATORS[kpi.kind]
        for reading in batch.readings:
            value = reading.metrics.get(kpi.metric)
            if value is None:
                continue
            key = WindowKey(
                batch.experiment_id, batch.group, kpi.window, window_start(reading.ts_ms, kpi.window)
            )
            k = key.encode()
            if k not in touched:
                touched[k] = (key, dict(load(k) or {}), set())
            _, window, changed = touched[k]
            state = window.get(kpi.name)
            if state is None or state.get("k") != kpi.kind:  # new, or its definition changed
                state = {"k": kpi.kind, "s": agg.initialize(), "n": 0, "r": state["r"] if state else 0}
            window[kpi.name] = {
                "k": kpi.kind,
                "s": agg.add(state["s"], value),
                "n": state["n"] + 1,
                "r": state["r"],
            }
            changed.add(kpi.name)
    kpis = {k.name: k for k in experiment.kpis}
    out = []
    for k, (key, window, changed) in touched.items():
        for name in sorted(changed):
            state = window[name]
            state["r"] += 1
            kpi = kpis[name]
            out.append(
                KpiValue(
                    experiment_id=key.experiment_id,
                    kpi=name,
                    metric=kpi.metric,
                    kind=kpi.kind,
                    device_group=key.device_group,
                    window_size_s=key.window_size_s,
                    window_start_ms=key.window_start_ms,
                    value=AGGREGATORS[kpi.kind].result(state["s"]),
                    sample_count=state["n"],
                    revision=state["r"],
                )
            )
        store(k, window)
    return out


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
