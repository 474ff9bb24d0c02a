"""Consumer lag per partition, from the true end offsets, in a background thread.

A service reports where it stands (``positions``: the next offset it will process, per
partition it owns — its own bookkeeping, no broker request), and every ``interval_s`` this
thread reads the partitions' end offsets once (:func:`pilotlab.kafka_admin.end_offsets`, which
corrects tansu's understated ListOffsets) and sets ``lag = end − position`` on a gauge labelled
``topic`` and ``partition``. Partitions the service no longer owns are removed from the gauge.

It never raises into the service: a failed read is counted (``errors``), logged without flooding
(pilotlab.errorlog), and the gauges keep their last values (``updated`` tells how old they are).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

from pilotlab import kafka_admin
from pilotlab.errorlog import ErrorLog

log = logging.getLogger("pilotlab.lag")

INTERVAL_S = 10.0  # one end-offset read per service every 10 s: tansu's CPU is the pipeline's main cost

Partition = tuple[str, int]


class LagMonitor:
    """``positions()`` → {(topic, partition): next offset to process, or None if unknown}, or
    None when the service cannot tell right now (rebalancing: the gauges are left as they are).
    ``resolve(partitions)`` → {partition: committed offset or None} for the unknown ones (a
    partition this process has not consumed from yet); without it, or still unknown, the
    position is taken as 0 (the start of the partition)."""

    def __init__(
        self,
        bootstrap: str,
        positions: Callable[[], dict[Partition, int | None] | None],
        gauge,
        *,
        updated=None,
        errors=None,
        resolve: Callable[[list[Partition]], dict[Partition, int | None]] | None = None,
        interval_s: float = INTERVAL_S,
        end_offsets: Callable[..., dict[Partition, int]] = kafka_admin.end_offsets,
        name: str = "lag",
    ) -> None:
        self.bootstrap = bootstrap
        self.positions, self.resolve = positions, resolve
        self.gauge, self.updated, self.errors = gauge, updated, errors
        self.interval_s = interval_s
        self._end_offsets = end_offsets
        self._shown: set[Partition] = set()
        self._stop = threading.Event()
        self._errors = ErrorLog(log, f"{name}: reading end offsets", every=60.0, grave=120.0)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> LagMonitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        wait, done = 1.0, False
        while not self._stop.wait(wait):
            result = self.update()
            done = done or result is True
            # until the service can first tell its positions, look again every second (no
            # broker request); after that, and after a failed read, every interval
            wait = 1.0 if result is None and not done else self.interval_s

    def update(self) -> bool | None:
        """One round: True if the gauges were set, None if the service could not tell its
        positions (nothing read), False if reading the end offsets failed. Never raises."""
        try:
            return self._update()
        except Exception as exc:  # noqa: BLE001 - a monitor must not take the service down
            if self.errors is not None:
                self.errors.inc()
            self._errors.failed(f"{type(exc).__name__}: {exc}")
            return False

    def _update(self) -> bool | None:
        positions = self.positions()
        if positions is None:
            return None
        positions = dict(positions)
        unknown = [tp for tp, pos in positions.items() if pos is None]
        if unknown and self.resolve is not None:
            for tp, pos in self.resolve(unknown).items():
                if tp in positions and positions[tp] is None:
                    positions[tp] = pos
        ends = self._end_offsets(self.bootstrap, sorted(positions)) if positions else {}
        for (topic, partition), pos in positions.items():
            self.gauge.labels(topic, str(partition)).set(max(0, ends[(topic, partition)] - (pos or 0)))
        for topic, partition in self._shown - positions.keys():
            with contextlib.suppress(KeyError):
                self.gauge.remove(topic, str(partition))
        self._shown = set(positions)
        if self.updated is not None:
            self.updated.set(time.time())
        if self._errors.since is not None:
            self._errors.ok()
        return True
