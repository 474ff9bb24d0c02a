"""Every KPI kind as a small, pure, mergeable aggregator over observations.

An observation is one value of a KPI's metric with its context (device, group, event time
``ts``, ingest time). A kind is built from its manifest entry and experiment
(``make(kpi, experiment)``, through :data:`REGISTRY`: one aggregator per name of
``pilotlab.kpi_kinds.KINDS``) and offers ``initialize() → state``, ``add(state, obs) →
state``, ``add_all(state, observations) → state`` (``add`` folded over one message's values in
their order: the same state, one call per message and window instead of one per value),
``merge(state, state) → state`` (both inputs' observations together) and
``result(state, group) → (value, details)``. States are small JSON values (they live in
Faust tables and their changelogs), no kind keeps raw events, and the result does not depend
on the order observations were added in (exactly for counts, sketches, min and max; to
floating-point rounding for sums and moments).

Kinds (docs/experiments.md):

* ``count``, ``sum``, ``mean``, ``min``, ``max`` — :mod:`streams.aggregators`.
* ``quantile`` (``q``) — a DDSketch (the ``ddsketch`` library's logarithmic mapping) with
  relative accuracy ``SKETCH_ALPHA`` = 1%: the value returned for the q-quantile is within
  ±1% (relative) of the sample of rank ⌊q·(n−1)⌋ in sorted order. Sketches merge by adding
  bucket counts, so the state is order-independent and mergeable across windows.
* ``exceedance`` (``threshold``) — share of samples strictly above the threshold.
* ``availability`` — share of the group's registered devices that reported the metric at
  least once in the window.
* ``completeness`` — samples received / samples expected, where a device declaring an
  interval of i seconds is expected to send ``window / i`` samples per window.
* ``freshness`` — p95 of the ingest delay (ingest time − ``ts``) in seconds, same sketch.
* ``impact`` — device-level difference-in-differences, treatment vs control and
  intervention vs baseline, with a 95% interval across devices and a verdict
  (:mod:`streams.impact`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ddsketch import DDSketch
from ddsketch.mapping import LogarithmicMapping

from pilotlab import kpi_kinds
from pilotlab.manifest import Experiment, Kpi
from streams import impact
from streams.aggregators import AGGREGATORS, Aggregator

SKETCH_ALPHA = 0.01  # relative accuracy of quantiles (the DDSketch guarantee)
_MAPPING = LogarithmicMapping(SKETCH_ALPHA)

WINDOWED = kpi_kinds.WINDOWED
ALL_KINDS = kpi_kinds.KIND_NAMES

Result = tuple[float | None, dict | None]


@dataclass(frozen=True, slots=True)
class Obs:
    """One value of a KPI's metric, in context."""

    value: float
    ts_ms: int
    device_id: str
    group: str
    received_ms: int


@dataclass(slots=True)  # not frozen: one per message and KPI, and a frozen __init__ costs 3x; nothing changes it
class Observations:
    """Values of a KPI's metric from one message (one device), in the message's order, with
    their ``ts``: what ``add_all`` takes (``Obs`` of each value, built once per batch)."""

    values: list[float]
    ts_ms: list[int]
    device_id: str
    group: str
    received_ms: int

    def each(self) -> list[Obs]:
        """The same observations one by one (what ``add_all`` is the fold of)."""
        return [
            Obs(v, ts, self.device_id, self.group, self.received_ms)
            for v, ts in zip(self.values, self.ts_ms, strict=True)
        ]


# --- sketch --------------------------------------------------------------------------------


def sketch_new() -> dict:
    """A DDSketch as JSON: positive and negative bucket counts by key, and the zero count."""
    return {"p": {}, "m": {}, "z": 0}


def sketch_add(state: dict, value: float) -> dict:
    return sketch_add_all(state, [value])


def sketch_add_all(state: dict, values: list[float]) -> dict:
    """A new state with ``values`` added: the bucket maps are copied once per call, not once
    per value (an add used to copy both per observation)."""
    out = {"p": dict(state["p"]), "m": dict(state["m"]), "z": state["z"]}
    positive, negative, smallest, key = out["p"], out["m"], _MAPPING.min_possible, _MAPPING.key
    for value in values:
        if value > smallest:
            store, k = positive, str(key(value))
        elif value < -smallest:
            store, k = negative, str(key(-value))
        else:
            out["z"] += 1
            continue
        store[k] = store.get(k, 0) + 1
    return out


def sketch_merge(a: dict, b: dict) -> dict:
    out = {"p": dict(a["p"]), "m": dict(a["m"]), "z": a["z"] + b["z"]}
    for side in ("p", "m"):
        for k, n in b[side].items():
            out[side][k] = out[side].get(k, 0) + n
    return out


def sketch_quantile(state: dict, q: float) -> float | None:
    """The q-quantile from the stored bucket counts: the same walk as the ddsketch library's
    ``DDSketch.get_quantile_value`` (rank ⌊q·(n−1)⌋, negative buckets from the most
    negative, then zeros, then positive buckets), without rebuilding a sketch each time."""
    total = sketch_count(state)
    if total == 0:
        return None
    rank = q * (total - 1)
    seen = 0
    for k in sorted((int(k) for k in state["m"]), reverse=True):
        seen += state["m"][str(k)]
        if seen > rank:
            return -_MAPPING.value(k)
    seen += state["z"]
    if seen > rank:
        return 0.0
    for k in sorted(int(k) for k in state["p"]):
        seen += state["p"][str(k)]
        if seen > rank:
            return _MAPPING.value(k)
    return _MAPPING.value(max(int(k) for k in state["p"]))


def sketch_quantile_reference(state: dict, q: float) -> float | None:
    """The same quantile by the library itself, rebuilding a ``DDSketch`` (tests compare)."""
    sketch = DDSketch(SKETCH_ALPHA)
    for k, n in state["p"].items():
        sketch.add(_MAPPING.value(int(k)), n)
    for k, n in state["m"].items():
        sketch.add(-_MAPPING.value(int(k)), n)
    if state["z"]:
        sketch.add(0.0, state["z"])
    return sketch.get_quantile_value(q) if sketch.count else None


def sketch_count(state: dict) -> int:
    return sum(state["p"].values()) + sum(state["m"].values()) + state["z"]


# --- kinds ---------------------------------------------------------------------------------


class KindAggregator(Protocol):
    """What every KPI kind offers (states are JSON values; ``add``, ``add_all`` and ``merge``
    return the new state, and only the impact kind updates its own state in place)."""

    def initialize(self) -> Any: ...

    def add(self, state: Any, obs: Obs) -> Any: ...

    def add_all(self, state: Any, obs: Observations) -> Any: ...

    def merge(self, a: Any, b: Any) -> Any: ...

    def result(self, state: Any, group: str) -> Result: ...


Factory = Callable[[Kpi, Experiment], KindAggregator]

REGISTRY: dict[str, Factory] = {}


def register(name: str, factory: Factory) -> Factory:
    """The aggregator of one kind of ``pilotlab.kpi_kinds.KINDS``; a name is registered once."""
    if name not in kpi_kinds.KINDS:
        raise ValueError(f"{name!r} is not a KPI kind of pilotlab.kpi_kinds.KINDS")
    if name in REGISTRY:
        raise ValueError(f"the KPI kind {name!r} already has an aggregator")
    REGISTRY[name] = factory
    return factory


class OfValue:
    """count/sum/mean/min/max: a fold of plain values (:mod:`streams.aggregators`) over the
    observations' values."""

    def __init__(self, fold: type[Aggregator]) -> None:
        self.fold = fold

    def initialize(self) -> Any:
        return self.fold.initialize()

    def add(self, state: Any, obs: Obs) -> Any:
        return self.fold.add(state, obs.value)

    def add_all(self, state: Any, obs: Observations) -> Any:
        return self.fold.add_all(state, obs.values)

    def merge(self, a: Any, b: Any) -> Any:
        return self.fold.merge(a, b)

    def result(self, state: Any, group: str) -> Result:
        return self.fold.result(state), None


class Quantile:
    def __init__(self, q: float) -> None:
        self.q = q

    def initialize(self) -> dict:
        return sketch_new()

    def add(self, state: dict, obs: Obs) -> dict:
        return sketch_add(state, obs.value)

    def add_all(self, state: dict, obs: Observations) -> dict:
        return sketch_add_all(state, obs.values)

    def merge(self, a: dict, b: dict) -> dict:
        return sketch_merge(a, b)

    def result(self, state: dict, group: str) -> Result:
        return sketch_quantile(state, self.q), {"q": self.q, "relative_accuracy": SKETCH_ALPHA}


class Freshness(Quantile):
    """p95 of the ingest delay in seconds (a device clock ahead of ingest counts as 0)."""

    def __init__(self) -> None:
        super().__init__(0.95)

    def add(self, state: dict, obs: Obs) -> dict:
        return sketch_add(state, max(0, obs.received_ms - obs.ts_ms) / 1000)

    def add_all(self, state: dict, obs: Observations) -> dict:
        return sketch_add_all(state, [max(0, obs.received_ms - ts) / 1000 for ts in obs.ts_ms])


class Exceedance:
    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def initialize(self) -> list:
        return [0, 0]  # [above, samples]

    def add(self, state: list, obs: Obs) -> list:
        return [state[0] + (obs.value > self.threshold), state[1] + 1]

    def add_all(self, state: list, obs: Observations) -> list:
        threshold = self.threshold
        return [state[0] + sum(v > threshold for v in obs.values), state[1] + len(obs.values)]

    def merge(self, a: list, b: list) -> list:
        return [a[0] + b[0], a[1] + b[1]]

    def result(self, state: list, group: str) -> Result:
        above, n = state
        return (above / n if n else None), {"above": above, "samples": n, "threshold": self.threshold}


class Availability:
    def __init__(self, experiment: Experiment) -> None:
        self._registered: dict[str, int] = {}
        for d in experiment.devices:
            self._registered[d.group] = self._registered.get(d.group, 0) + 1

    def initialize(self) -> list:
        return []  # sorted ids of the devices that reported (at most the registered ones)

    def add(self, state: list, obs: Obs) -> list:
        return state if obs.device_id in state else sorted([*state, obs.device_id])

    def add_all(self, state: list, obs: Observations) -> list:
        if not obs.values or obs.device_id in state:
            return state
        return sorted([*state, obs.device_id])

    def merge(self, a: list, b: list) -> list:
        return sorted(set(a) | set(b))

    def result(self, state: list, group: str) -> Result:
        registered = self._registered.get(group, 0)
        value = len(state) / registered if registered else None
        return value, {"reporting": len(state), "registered": registered}


class Completeness:
    def __init__(self, experiment: Experiment, window_s: int) -> None:
        self._expected: dict[str, float] = {}
        for d in experiment.devices:
            self._expected[d.group] = self._expected.get(d.group, 0.0) + window_s / d.interval

    def initialize(self) -> list:
        return [0]

    def add(self, state: list, obs: Obs) -> list:
        return [state[0] + 1]

    def add_all(self, state: list, obs: Observations) -> list:
        return [state[0] + len(obs.values)]

    def merge(self, a: list, b: list) -> list:
        return [a[0] + b[0]]

    def result(self, state: list, group: str) -> Result:
        expected = self._expected.get(group, 0.0)
        value = state[0] / expected if expected else None
        return value, {"received": state[0], "expected": expected}


# --- impact --------------------------------------------------------------------------------


class Impact:
    """One state per experiment over its whole span: per device, its readings and their sum
    in each half of the baseline and in the intervention (``streams.impact``)."""

    def __init__(self, experiment: Experiment, kpi: Kpi) -> None:
        self.design = impact.design(experiment, kpi)
        self.has_control = any(d.group == "control" for d in experiment.devices)
        self.window_start_ms = self.design.baseline[0]
        self.window_size_s = (self.design.intervention[1] - self.design.baseline[0]) // 1000

    def period(self, ts_ms: int) -> str | None:
        cell = self.design.cell(ts_ms)
        return None if cell is None else "intervention" if cell == "i" else "baseline"

    def initialize(self) -> dict:
        return impact.initialize()

    def add(self, state: dict, obs: Obs) -> dict:
        """Updates ``state`` in place (the engine hands out its own decoded copy)."""
        return impact.add(state, self.design, obs.device_id, obs.group, obs.ts_ms, obs.value)

    def add_all(self, state: dict, obs: Observations) -> dict:
        """Updates ``state`` in place, as ``add``."""
        return impact.add_all(state, self.design, obs.device_id, obs.group, obs.ts_ms, obs.values)

    def merge(self, a: dict, b: dict) -> dict:
        return impact.merge(a, b)

    def result(self, state: dict, group: str) -> Result:
        r = impact.analyse(state, self.design, self.has_control)
        return r.estimate, r.as_dict()


# --- the registry: one aggregator per kind of pilotlab.kpi_kinds.KINDS ----------------------------

for _fold in AGGREGATORS.values():
    register(_fold.kind, lambda kpi, experiment, fold=_fold: OfValue(fold))
register("quantile", lambda kpi, experiment: Quantile(kpi.q))
register("exceedance", lambda kpi, experiment: Exceedance(kpi.threshold))
register("availability", lambda kpi, experiment: Availability(experiment))
register("completeness", lambda kpi, experiment: Completeness(experiment, kpi.window))
register("freshness", lambda kpi, experiment: Freshness())
register("impact", lambda kpi, experiment: Impact(experiment, kpi))


def make(kpi: Kpi, experiment: Experiment) -> KindAggregator:
    """The aggregator of one manifest KPI."""
    return REGISTRY[kpi.kind](kpi, experiment)
