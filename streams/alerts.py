"""The alert rules engine, free of Kafka, databases and clocks: state in, (transitions, new
state) out.

``evaluate(state, events, experiment, rules)`` folds one experiment's events (accepted
readings, refusals, KPI windows) into its alert state and returns the firing → resolved
transitions they cause, each stamped with the **event time** it happened at. Nothing here
reads a wall clock: time is what the events carry.

Clocks, per experiment (all in the state):

- the readings' watermark ``wm``: the newest reading ``ts`` (device time) — device offline and
  completeness rules;
- the ingest clock ``in``: the newest ``received_ms`` of an accepted message or a refusal —
  rejection-rate rules (a refused message has no device time to trust);
- each KPI's clock: the newest window start seen of that KPI — KPI rules.

A rule judges a moment only once its clock is ``grace`` past it (the *settled* point). Events
add up commutatively (counts, the newest revision, the sorted readings of a device not yet
settled) and are judged in event-time order at the settled point, so any arrival order in
which no event comes later than ``grace`` behind its clock, cut into any calls, gives exactly
the same transitions (``tests/unit/test_alerts_engine.py`` checks this with hypothesis).
An event later than that is applied as well as it still can be: a reading of a device
resolves its offline alert (never before the alert fired); counts for an already judged
window are dropped.

Kinds (the rule fields are in ``pilotlab.manifest.AlertRule``, the semantics in
docs/alerts.md):

- ``device_offline`` (per device): fires at ``last + after`` once the settled point reaches
  it, where ``last`` is the device's newest reading; resolves at the ``ts`` of its next
  reading. A gap longer than ``after`` between two readings fires and resolves. ``after``
  defaults to the experiment's liveness threshold (``offline_after`` × interval), which makes
  the transitions those of ``streams.engine.advance`` on ``pilotlab.device-status``. Devices
  that never reported are not judged.
- ``completeness_below`` (per device): readings received in a tumbling window of ``window``
  (by their ``ts``) ÷ ``window / interval``; fires at the end of a window below ``threshold``,
  resolves at the end of the next one at or above it. A device's windows are judged from its
  first whole window on; a silent device's windows count 0.
- ``rejection_rate_above`` (per device): refused items ÷ (refused + accepted readings) in a
  tumbling window of ingest time; windows with fewer than ``min_count`` items, or none, change
  nothing.
- ``kpi_above`` / ``kpi_below`` (per group, subject ``kpi:group``): a KPI window, with its
  newest revision, is judged once a window of that KPI starting ``grace`` or more after its end
  has been seen; fires at the end of a breaching window, resolves at the end of the next one
  that does not breach. Windows without a value change nothing.

A rule whose definition changed, or that was removed or disabled, resolves what it had firing
(at the experiment's watermark) and starts afresh.
"""

from __future__ import annotations

import hashlib
from bisect import insort
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import orjson

from pilotlab.contracts import KpiValue, ReadingBatch, Rejection, from_ms
from pilotlab.manifest import AlertRule, Experiment

# --- inputs ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Readings:
    """One accepted message of a device: its readings' times and when ingest received it."""

    device_id: str
    ts_ms: tuple[int, ...]
    received_ms: int


@dataclass(frozen=True, slots=True)
class Refused:
    """One refused message or batch item of a registered device."""

    device_id: str
    received_ms: int
    reason: str


@dataclass(frozen=True, slots=True)
class KpiWindow:
    """One revision of one KPI window of one group."""

    kpi: str
    group: str
    window_start_ms: int
    window_size_s: int
    value: float | None
    revision: int


Event = Readings | Refused | KpiWindow


def from_batch(batch: ReadingBatch) -> Readings:
    return Readings(batch.device_id, tuple(r.ts_ms for r in batch.readings), batch.received_ms)


def from_rejection(rej: Rejection) -> Refused | None:
    if rej.device_id is None or rej.experiment_id is None:
        return None
    return Refused(rej.device_id, rej.received_ms, str(rej.reason))


def from_kpi(v: KpiValue) -> KpiWindow:
    return KpiWindow(v.kpi, v.device_group, v.window_start_ms, v.window_size_s, v.value, v.revision)


# --- outputs ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Transition:
    """An alert starting (``firing``) or ending (``resolved``). ``fired_at_ms`` identifies the
    episode (with experiment, rule and subject); ``at_ms`` is when this transition happened, in
    the rule's event time."""

    experiment_id: str
    rule: str
    kind: str
    severity: str
    subject: str
    device_id: str | None
    status: str  # "firing" | "resolved"
    fired_at_ms: int
    at_ms: int
    value: float | None
    threshold: float | None
    summary: str

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.experiment_id, self.rule, self.subject, self.fired_at_ms)

    @property
    def alert_id(self) -> str:
        return alert_id(*self.key)


def alert_id(experiment_id: str, rule: str, subject: str, fired_at_ms: int) -> str:
    """The episode's stable id (its natural key, hashed): the same alert after a replay or a
    restart has the same id."""
    h = hashlib.blake2b(digest_size=16)
    for part in (experiment_id, rule, subject, str(fired_at_ms)):
        h.update(len(part).to_bytes(4, "big"))
        h.update(part.encode())
    return h.hexdigest()


# --- the engine --------------------------------------------------------------------------------


def new_state() -> dict:
    return {"wm": None, "in": None, "kc": {}, "r": {}}


def evaluate(
    state: dict | None, events: Iterable[Event], experiment: Experiment, rules: Sequence[AlertRule]
) -> tuple[list[Transition], dict]:
    """Fold ``events`` (one experiment's, any order) into ``state`` and judge every rule up to
    its settled point. Returns the transitions, sorted by event time, and the new state (the
    given one is left as it was). States are JSON values. Apply them in this order: a rule
    that changed resolves its alerts first, and may fire them again after."""
    st = new_state() if state is None else orjson.loads(orjson.dumps(state))
    out: list[Transition] = []
    events = list(events)

    # the clocks first: every event of the call counts before anything is judged
    for e in events:
        if isinstance(e, Readings) and e.ts_ms:
            newest = max(e.ts_ms)
            st["wm"] = newest if st["wm"] is None else max(st["wm"], newest)
        if isinstance(e, Readings | Refused):
            st["in"] = e.received_ms if st["in"] is None else max(st["in"], e.received_ms)
        if isinstance(e, KpiWindow):
            kc = st["kc"].get(e.kpi)
            st["kc"][e.kpi] = e.window_start_ms if kc is None else max(kc, e.window_start_ms)

    current = {r.name: r for r in rules}
    kept: dict[str, dict] = {}
    for name in sorted(st["r"]):  # removed, disabled or changed rules resolve what they had firing
        rule = current.get(name)
        rs = st["r"][name]
        if rule is None or rs["sig"] != _signature(rule):
            at = st["wm"] if st["wm"] is not None else (st["in"] or 0)
            why = "rule removed" if rule is None else "rule changed"
            for subject, f in sorted(rs["f"].items()):
                out.append(_resolved(experiment.id, rs, subject, f, at=max(at, f["at"]), value=None, summary=why))
            del st["r"][name]
            if rule is not None and rule.kind == rs["kind"] == "device_offline":
                kept[name] = rs["s"]  # the devices' last readings hold whatever the threshold

    done = len(out)
    for rule in rules:
        rs = st["r"].get(rule.name)
        if rs is None:
            rs = st["r"][rule.name] = {
                "sig": _signature(rule),
                "kind": rule.kind,
                "sev": rule.severity,
                "thr": rule.threshold,
                "f": {},
                "s": kept.get(rule.name, {}),
            }
        judge = _KINDS[rule.kind](experiment, rule, rs, out)
        for e in events:
            judge.add(e)
        clock = judge.clock(st)
        if clock is not None:
            judge.settle(clock - rule.grace * 1000)
    # what a changed or removed rule resolved comes first (before its new definition fires the
    # same subject again), then everything by event time
    out[done:] = sorted(out[done:], key=lambda t: (t.at_ms, t.rule, t.subject, t.status != "resolved"))
    return out, st


def _signature(rule: AlertRule) -> str:
    return orjson.dumps(rule.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS).decode()


def _iso(ms: int) -> str:
    return from_ms(ms).strftime("%Y-%m-%dT%H:%M:%SZ")


def _window_start(ts_ms: int, size_ms: int) -> int:
    return ts_ms - ts_ms % size_ms


def _resolved(
    exp_id: str, rs: dict, subject: str, f: dict, *, at: int, value: float | None, summary: str
) -> Transition:
    return Transition(
        exp_id,
        f["rule"],
        rs["kind"],
        rs["sev"],
        subject,
        f.get("dev"),
        "resolved",
        f["at"],
        at,
        value,
        rs["thr"],
        summary,
    )


class _Rule:
    """One rule's judge over its slice of the state (``rs``): ``f`` the firing subjects,
    ``s`` the kind's own state."""

    def __init__(self, experiment: Experiment, rule: AlertRule, rs: dict, out: list[Transition]) -> None:
        self.exp, self.rule, self.rs, self.out = experiment, rule, rs, out
        self.firing: dict = rs["f"]
        self.s: dict = rs["s"]

    # the kind's part
    def add(self, e: Event) -> None:
        raise NotImplementedError

    def clock(self, st: dict) -> int | None:
        return st["wm"]

    def settle(self, point: int) -> None:
        raise NotImplementedError

    # shared
    def in_scope(self, device_id: str):
        if self.rule.devices is not None and device_id not in self.rule.devices:
            return None
        return self.exp.device(device_id)

    def fire(self, subject: str, device_id: str | None, at: int, value: float | None, summary: str) -> None:
        if subject in self.firing:
            return
        self.firing[subject] = {"at": at, "rule": self.rule.name, "dev": device_id}
        self.out.append(
            Transition(
                self.exp.id,
                self.rule.name,
                self.rule.kind,
                self.rule.severity,
                subject,
                device_id,
                "firing",
                at,
                at,
                value,
                self.rule.threshold,
                summary,
            )
        )

    def resolve(self, subject: str, at: int, value: float | None, summary: str) -> None:
        f = self.firing.pop(subject, None)
        if f is not None:
            self.out.append(
                _resolved(self.exp.id, self.rs, subject, f, at=max(at, f["at"]), value=value, summary=summary)
            )


class _Offline(_Rule):
    """``s``: ``{"c": settled point, "d": {device: [last settled reading, [unsettled readings]]}}``"""

    def threshold_ms(self, device) -> int:
        if self.rule.after is not None:
            return self.rule.after * 1000
        return self.exp.offline_after * device.interval * 1000

    def add(self, e: Event) -> None:
        if not isinstance(e, Readings) or not e.ts_ms or self.in_scope(e.device_id) is None:
            return
        devices = self.s.setdefault("d", {})
        entry = devices.setdefault(e.device_id, [None, []])
        c = self.s.get("c")
        for t in e.ts_ms:
            if c is not None and t <= c:  # later than grace: apply it as well as we still can
                last = entry[0]
                if last is None or t > last:
                    entry[0] = t
                    f = self.firing.get(e.device_id)
                    if f is not None and t >= f["at"]:
                        self.resolve(
                            e.device_id,
                            t,
                            (t - last) / 1000 if last is not None else None,
                            f"{e.device_id} reports again ({_iso(t)}), late",
                        )
            elif t not in entry[1]:
                insort(entry[1], t)

    def settle(self, point: int) -> None:
        c = self.s.get("c")
        self.s["c"] = point if c is None else max(c, point)
        for device_id in sorted(self.s.get("d", {})):
            device = self.in_scope(device_id)
            entry = self.s["d"][device_id]
            if device is None:
                continue
            thr = self.threshold_ms(device)
            last, pending = entry
            keep = []
            for t in pending:
                if t > point:
                    keep.append(t)
                    continue
                if last is not None and t - last > thr:
                    self.fire(device_id, device_id, last + thr, thr / 1000, self._silent(device_id, last, thr))
                    self.resolve(
                        device_id,
                        t,
                        (t - last) / 1000,
                        f"{device_id} reports again after {_span((t - last) // 1000)} of silence",
                    )
                elif device_id in self.firing and t >= self.firing[device_id]["at"]:
                    self.resolve(device_id, t, None, f"{device_id} reports again")
                last = t if last is None else max(last, t)
            entry[0], entry[1] = last, keep
            if last is not None and last + thr <= point:
                self.fire(device_id, device_id, last + thr, thr / 1000, self._silent(device_id, last, thr))

    @staticmethod
    def _silent(device_id: str, last: int, thr: int) -> str:
        return f"{device_id} silent for {_span(thr // 1000)} (last reading {_iso(last)})"


class _Completeness(_Rule):
    """``s``: ``{device: {"first": earliest reading, "n": next window to judge, "w": {start: count}}}``"""

    def add(self, e: Event) -> None:
        if not isinstance(e, Readings) or not e.ts_ms or self.in_scope(e.device_id) is None:
            return
        size = self.rule.window_s * 1000
        d = self.s.setdefault(e.device_id, {"first": None, "n": None, "w": {}})
        for t in e.ts_ms:
            if d["n"] is None:
                d["first"] = t if d["first"] is None else min(d["first"], t)
            elif t < d["n"]:
                continue  # its window is judged already
            k = str(_window_start(t, size))
            d["w"][k] = d["w"].get(k, 0) + 1

    def settle(self, point: int) -> None:
        size = self.rule.window_s * 1000
        for device_id in sorted(self.s):
            device = self.in_scope(device_id)
            if device is None:
                continue
            d = self.s[device_id]
            if d["n"] is None:
                first = d["first"]
                start = _window_start(first, size)
                d["n"] = start if start == first else start + size
                d["w"] = {k: v for k, v in d["w"].items() if int(k) >= d["n"]}
            expected = self.rule.window_s / device.interval
            while d["n"] + size <= point:
                n = d["n"]
                count = d["w"].pop(str(n), 0)
                if count == 0 and device_id in self.firing:  # silent: jump to the next window with data
                    later = [int(k) for k in d["w"] if int(k) > n]
                    last_whole = _window_start(point, size) - size
                    d["n"] = min([*later, last_whole + size])
                    continue
                ratio = count / expected
                end = n + size
                if ratio < self.rule.threshold:
                    self.fire(
                        device_id,
                        device_id,
                        end,
                        ratio,
                        f"{device_id} sent {count} of {expected:g} expected readings "
                        f"({100 * ratio:.0f}%) in {_span(self.rule.window_s)} to {_iso(end)}",
                    )
                else:
                    self.resolve(
                        device_id,
                        end,
                        ratio,
                        f"{device_id} complete again: {100 * ratio:.0f}% in the window to {_iso(end)}",
                    )
                d["n"] = end


class _RejectionRate(_Rule):
    """``s``: ``{device: {"j": last judged window, "w": {start: [accepted, refused]}}}``; ingest time."""

    def clock(self, st: dict) -> int | None:
        return st["in"]

    def add(self, e: Event) -> None:
        if isinstance(e, Readings):
            accepted, refused = len(e.ts_ms), 0
        elif isinstance(e, Refused):
            if self.rule.reasons is not None and e.reason not in self.rule.reasons:
                return
            accepted, refused = 0, 1
        else:
            return
        if self.in_scope(e.device_id) is None:
            return
        start = _window_start(e.received_ms, self.rule.window_s * 1000)
        d = self.s.setdefault(e.device_id, {"j": None, "w": {}})
        if d["j"] is not None and start <= d["j"]:
            return
        counts = d["w"].setdefault(str(start), [0, 0])
        counts[0] += accepted
        counts[1] += refused

    def settle(self, point: int) -> None:
        size = self.rule.window_s * 1000
        for device_id in sorted(self.s):
            d = self.s[device_id]
            for start in sorted(int(k) for k in d["w"]):
                if start + size > point:
                    break
                accepted, refused = d["w"].pop(str(start))
                d["j"] = start
                total = accepted + refused
                if total < self.rule.min_count:
                    continue
                rate, end = refused / total, start + size
                if rate > self.rule.threshold:
                    self.fire(
                        device_id,
                        device_id,
                        end,
                        rate,
                        f"{device_id}: {refused} of {total} items refused ({100 * rate:.0f}%) "
                        f"in {_span(self.rule.window_s)} to {_iso(end)}",
                    )
                else:
                    self.resolve(
                        device_id,
                        end,
                        rate,
                        f"{device_id}: refusals down to {100 * rate:.0f}% in the window to {_iso(end)}",
                    )


class _KpiThreshold(_Rule):
    """``s``: ``{group: {"j": last judged window, "w": {start: [value, revision, size]}}}``"""

    def clock(self, st: dict) -> int | None:
        return st["kc"].get(self.rule.kpi)

    def add(self, e: Event) -> None:
        if not isinstance(e, KpiWindow) or e.kpi != self.rule.kpi:
            return
        if self.rule.group is not None and e.group != self.rule.group:
            return
        g = self.s.setdefault(e.group, {"j": None, "w": {}})
        if g["j"] is not None and e.window_start_ms <= g["j"]:
            return
        held = g["w"].get(str(e.window_start_ms))
        if held is None or held[1] < e.revision:
            g["w"][str(e.window_start_ms)] = [e.value, e.revision, e.window_size_s]

    def settle(self, point: int) -> None:
        above = self.rule.kind == "kpi_above"
        for group in sorted(self.s):
            g = self.s[group]
            subject = f"{self.rule.kpi}:{group}"
            for start in sorted(int(k) for k in g["w"]):
                value, _rev, size_s = g["w"][str(start)]
                end = start + size_s * 1000
                if end > point:
                    break
                del g["w"][str(start)]
                g["j"] = start
                if value is None:
                    continue
                breach = value > self.rule.threshold if above else value < self.rule.threshold
                word = "above" if above else "below"
                if breach:
                    self.fire(
                        subject,
                        None,
                        end,
                        value,
                        f"{self.rule.kpi} ({group}) {value:.4g} {word} {self.rule.threshold:g} "
                        f"in the window to {_iso(end)}",
                    )
                else:
                    self.resolve(
                        subject,
                        end,
                        value,
                        f"{self.rule.kpi} ({group}) back to {value:.4g} in the window to {_iso(end)}",
                    )


_KINDS: dict[str, type[_Rule]] = {
    "device_offline": _Offline,
    "completeness_below": _Completeness,
    "rejection_rate_above": _RejectionRate,
    "kpi_above": _KpiThreshold,
    "kpi_below": _KpiThreshold,
}


def _span(seconds: int) -> str:
    seconds = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size} {unit}"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds} s"


def firing(state: dict | None) -> list[tuple[str, str, int]]:
    """The (rule, subject, fired_at) of every alert firing in a state."""
    if not state:
        return []
    return sorted((name, subject, f["at"]) for name, rs in state["r"].items() for subject, f in rs["f"].items())
