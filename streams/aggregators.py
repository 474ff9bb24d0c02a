"""Aggregators of plain values: small, pure, mergeable. ``initialize() → state``,
``add(state, value) → state``, ``merge(state, state) → state`` (the state of both inputs'
values together), ``result(state) → value``, as quix-streams' window aggregations, and
``add_all(state, values) → state``: ``add`` folded over a list in its order, the same state to
the last bit (the streams worker adds a message's values of one window at once: one call
instead of one per value). No function changes its input state. States are
short JSON lists (they live in Faust tables and their changelogs); no aggregator keeps raw
events. The KPI kinds ``count``, ``sum``, ``mean``, ``min`` and ``max`` are these folds of the
observation's value (``streams.kpis.REGISTRY``).
"""

from __future__ import annotations

from typing import ClassVar, Protocol


class Aggregator(Protocol):
    kind: ClassVar[str]

    @staticmethod
    def initialize() -> list: ...

    @staticmethod
    def add(state: list, value: float) -> list: ...

    @staticmethod
    def add_all(state: list, values: list[float]) -> list: ...

    @staticmethod
    def merge(a: list, b: list) -> list: ...

    @staticmethod
    def result(state: list) -> float | None: ...


class Count:
    kind = "count"

    @staticmethod
    def initialize() -> list:
        return [0]

    @staticmethod
    def add(state: list, value: float) -> list:
        return [state[0] + 1]

    @staticmethod
    def add_all(state: list, values: list[float]) -> list:
        return [state[0] + len(values)]

    @staticmethod
    def merge(a: list, b: list) -> list:
        return [a[0] + b[0]]

    @staticmethod
    def result(state: list) -> float | None:
        return float(state[0])


class Sum:
    """Kahan-compensated sum: [sum, compensation]."""

    kind = "sum"

    @staticmethod
    def initialize() -> list:
        return [0.0, 0.0]

    @staticmethod
    def add(state: list, value: float) -> list:
        total, comp = state
        y = value - comp
        t = total + y
        return [t, (t - total) - y]

    @staticmethod
    def add_all(state: list, values: list[float]) -> list:
        total, comp = state
        for value in values:  # add's steps, in locals
            y = value - comp
            t = total + y
            total, comp = t, (t - total) - y
        return [total, comp]

    @staticmethod
    def merge(a: list, b: list) -> list:
        """a's sum plus b's, then b's compensation taken back (b's value is its sum − comp)."""
        return Sum.add(Sum.add(a, b[0]), -b[1])

    @staticmethod
    def result(state: list) -> float | None:
        return state[0]


class Mean:
    """Welford's running mean: [n, mean] (stable for long windows)."""

    kind = "mean"

    @staticmethod
    def initialize() -> list:
        return [0, 0.0]

    @staticmethod
    def add(state: list, value: float) -> list:
        n, mean = state
        n += 1
        return [n, mean + (value - mean) / n]

    @staticmethod
    def add_all(state: list, values: list[float]) -> list:
        n, mean = state
        for value in values:  # add's steps, in locals
            n += 1
            mean = mean + (value - mean) / n
        return [n, mean]

    @staticmethod
    def merge(a: list, b: list) -> list:
        """Chan et al.'s pairwise update of the mean."""
        n = a[0] + b[0]
        if n == 0:
            return [0, 0.0]
        return [n, a[1] + (b[1] - a[1]) * b[0] / n]

    @staticmethod
    def result(state: list) -> float | None:
        return state[1] if state[0] else None


class Min:
    kind = "min"

    @staticmethod
    def initialize() -> list:
        return [None]

    @staticmethod
    def add(state: list, value: float) -> list:
        return [value if state[0] is None else min(state[0], value)]

    @staticmethod
    def add_all(state: list, values: list[float]) -> list:
        low = state[0]
        for value in values:
            low = value if low is None else min(low, value)
        return [low]

    @staticmethod
    def merge(a: list, b: list) -> list:
        return a if b[0] is None else Min.add(a, b[0])

    @staticmethod
    def result(state: list) -> float | None:
        return state[0]


class Max:
    kind = "max"

    @staticmethod
    def initialize() -> list:
        return [None]

    @staticmethod
    def add(state: list, value: float) -> list:
        return [value if state[0] is None else max(state[0], value)]

    @staticmethod
    def add_all(state: list, values: list[float]) -> list:
        high = state[0]
        for value in values:
            high = value if high is None else max(high, value)
        return [high]

    @staticmethod
    def merge(a: list, b: list) -> list:
        return a if b[0] is None else Max.add(a, b[0])

    @staticmethod
    def result(state: list) -> float | None:
        return state[0]


AGGREGATORS: dict[str, type[Aggregator]] = {a.kind: a for a in (Count, Sum, Mean, Min, Max)}


def aggregate(kind: str, values: list[float]) -> float | None:
    """Fold a plain list through an aggregator (for tests and batch recomputation)."""
    agg = AGGREGATORS[kind]
    state = agg.initialize()
    for v in values:
        state = agg.add(state, v)
    return agg.result(state)
