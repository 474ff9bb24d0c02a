"""The KPI engine, free of Faust: fold a batch of readings into event-time tumbling windows.

Windows are keyed by experiment, KPI, device group, window size and window start (all in
the reading's own time, ``ts``). ``apply_batch`` reads and writes window states through two
callables, so the same code runs on a dict in tests and on a Faust table in the worker.
Each update raises the window's revision; storage keeps the highest revision.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pilotlab.contracts import KpiValue, ReadingBatch
from pilotlab.manifest import Experiment
from streams.aggregators import AGGREGATORS

WindowState = dict  # {"s": aggregator state, "n": samples, "r": revision}


def window_start(ts_ms: int, size_s: int) -> int:
    size_ms = size_s * 1000
    return ts_ms - ts_ms % size_ms


@dataclass(frozen=True, slots=True)
class WindowKey:
    experiment_id: str
    kpi: str
    device_group: str
    window_size_s: int
    window_start_ms: int

    def encode(self) -> str:
        return f"{self.experiment_id}|{self.kpi}|{self.device_group}|{self.window_size_s}|{self.window_start_ms}"


def apply_batch(
    batch: ReadingBatch,
    experiment: Experiment,
    load: Callable[[str], WindowState | None],
    store: Callable[[str, WindowState], None],
) -> list[KpiValue]:
    """Add the batch's readings to every KPI window they fall in; return the updated KPIs."""
    touched: dict[str, tuple[WindowKey, WindowState]] = {}
    for kpi in experiment.kpis:
        agg = AGGREGATORS[kpi.kind]
        for reading in batch.readings:
            value = reading.metrics.get(kpi.metric)
            if value is None:
                continue
            key = WindowKey(
                batch.experiment_id, kpi.name, batch.group, kpi.window, window_start(reading.ts_ms, kpi.window)
            )
            k = key.encode()
            if k in touched:
                state = touched[k][1]
            else:
                state = load(k) or {"s": agg.initialize(), "n": 0, "r": 0}
            touched[k] = (key, {"s": agg.add(state["s"], value), "n": state["n"] + 1, "r": state["r"]})
    kpis = {k.name: k for k in experiment.kpis}
    out = []
    for k, (key, state) in touched.items():
        state["r"] += 1
        store(k, state)
        kpi = kpis[key.kpi]
        out.append(
            KpiValue(
                experiment_id=key.experiment_id,
                kpi=kpi.name,
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
    return out
