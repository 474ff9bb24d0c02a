"""KPI aggregators: small, pure, mergeable. ``initialize() → state``, ``add(state, value) →
state``, ``result(state) → value``. States are short JSON lists (they live in Faust tables
and their changelogs); no aggregator keeps raw events.
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
