"""The KPI engine, free of Faust: fold readings into event-time tumbling windows.

Windows are keyed by experiment, device group, window size and window start (all in the
reading's own time, ``ts``). The engine reads and writes its state through two callables
(``get``/``put`` of string keys), so the same code runs on a dict in tests and on the
worker's checkpointed state (``streams.checkpoint``). ``step`` takes one message through
de-duplication, allowed lateness, the windows and device liveness; each update raises a
window's revision, and storage keeps the highest revision.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise

from pilotlab.contracts import DeviceStatus, KpiValue, Reading, ReadingBatch
from pilotlab.kpi_kinds import KINDS
from pilotlab.manifest import Experiment
from streams import kpis

WindowState = dict  # {"s": aggregator state, "n": samples, "r": revision}


def window_start(ts_ms: int, size_s: int) -> int:
    size_ms = size_s * 1000
    return ts_ms - ts_ms % size_ms


def window_key(experiment_id: str, group: str, size_s: int, start_ms: int) -> str:
    """One stored window: every KPI of an experiment group with the same window size shares
    it, so a batch updates one state entry per window rather than one per KPI."""
    return f"{experiment_id}|{group}|{size_s}|{start_ms}"


@dataclass(frozen=True, slots=True)
class Plan:
    """What the engine needs of one manifest KPI, worked out once per registry snapshot of
    the experiment rather than per reading (signatures, kind lookups, key prefixes)."""

    name: str
    metric: str
    signature: str
    agg: kpis.KindAggregator
    windowed: bool
    window: int  # seconds (windowed kinds)


@dataclass(frozen=True, slots=True)
class Made:
    experiment: Experiment
    aggregators: dict  # KPI name → aggregator
    plans: tuple[Plan, ...]  # in the manifest's order
    closing: tuple[tuple[str, int], ...]  # (metric, window s) of the windowed KPIs (``closes_at``)


_MADE: dict[tuple[str, int], Made] = {}


def made_of(experiment: Experiment) -> Made:
    """The experiment's aggregators and plans, built once per registry snapshot (manifests
    are frozen: a new snapshot is a new object)."""
    key = (experiment.id, id(experiment))
    hit = _MADE.get(key)
    if hit is None or hit.experiment is not experiment:
        if len(_MADE) > 256:
            _MADE.clear()
        aggs = {k.name: kpis.make(k, experiment) for k in experiment.kpis}
        plans = tuple(
            Plan(k.name, k.metric, k.signature(), aggs[k.name], KINDS[k.kind].windowed, k.window)
            for k in experiment.kpis
        )
        closing = tuple((p.metric, p.window) for p in plans if p.windowed)
        hit = _MADE[key] = Made(experiment, aggs, plans, closing)
    return hit


def aggregators_of(experiment: Experiment) -> dict:
    """KPI name → aggregator, built once per registry snapshot of the experiment."""
    return made_of(experiment).aggregators


IMPACT_GROUP = "all"  # impact KPIs span both groups


def apply_batch(
    batch: ReadingBatch,
    experiment: Experiment,
    load: Callable[[str], dict[str, WindowState] | None],
    store: Callable[[str, dict[str, WindowState]], None],
) -> dict[str, set[str]]:
    """Add the batch's readings to every KPI window they fall in; return the windows touched
    (``window_key`` → names of the KPIs that changed).

    A stored window maps KPI name → ``{"k": kind signature, "s": aggregator state, "n":
    samples, "r": revision}``; each message that changes a KPI raises its revision by one.
    When a manifest update changes what a KPI computes, its window starts afresh (the
    revision keeps growing, so storage takes the new value). Impact KPIs have one window over
    the experiment's whole span, shared by both groups. ``load`` may hand out the stored
    window itself: it is updated in place, then handed back through ``store``.
    """
    windows: dict[str, dict[str, WindowState]] = {}
    touched: dict[str, set[str]] = {}
    group, device_id, received = batch.group, batch.device_id, batch.received_ms
    columns = Columns.of(batch)
    for plan in made_of(experiment).plans:
        name, agg, sig = plan.name, plan.agg, plan.signature
        for k, (values, stamps) in values_by_window(plan, batch, columns).items():
            window = windows.get(k)
            if window is None:
                window = windows[k] = load(k) or {}
                touched[k] = set()
            state = window.get(name)
            if state is None or state["k"] != sig:  # new, or its definition changed
                state = window[name] = {"k": sig, "s": agg.initialize(), "n": 0, "r": state["r"] if state else 0}
            state["s"] = agg.add_all(state["s"], kpis.Observations(values, stamps, device_id, group, received))
            state["n"] += len(values)
            touched[k].add(name)
    for k, window in windows.items():
        for name in touched[k]:
            window[name]["r"] += 1
        store(k, window)
    return touched


@dataclass(slots=True)  # not frozen: one per message, and a frozen __init__ costs 3x; nothing changes it
class Columns:
    """A batch's readings as columns, made once per batch for all its KPIs."""

    stamps: list[int]
    metrics: list[dict[str, float]]
    oldest: int
    newest: int

    @staticmethod
    def of(batch: ReadingBatch) -> Columns:
        stamps = [r.ts_ms for r in batch.readings]
        return Columns(stamps, [r.metrics for r in batch.readings], min(stamps, default=0), max(stamps, default=0))

    def values(self, metric: str) -> tuple[list[float], list[int]]:
        """One metric's values and their ``ts`` in the batch's order, readings without it left
        out. The lists are shared by the KPIs of the batch: read them, never change them."""
        values = [m.get(metric) for m in self.metrics]
        if None not in values:
            return values, self.stamps
        keep = [i for i, v in enumerate(values) if v is not None]
        return [values[i] for i in keep], [self.stamps[i] for i in keep]


def values_by_window(
    plan: Plan, batch: ReadingBatch, columns: Columns
) -> dict[str, tuple[list[float], list[int]]]:
    """The batch's values of one KPI's metric and their ``ts``, by ``window_key``, each list
    in the batch's order (so that ``add_all`` folds exactly what one ``add`` per reading did),
    the windows in the order the readings first reach them. A window key is written once per
    window, not per reading. A message's readings mostly share one window (or impact period):
    then the values are taken as one column, without a look at each reading's window."""
    metric, out = plan.metric, {}
    last_start, lists = None, None
    if plan.windowed:
        size_ms = plan.window * 1000
        prefix = window_key(batch.experiment_id, batch.group, plan.window, 0)[:-1]  # without the start
        start = window_start(columns.oldest, plan.window)
        if columns.newest < start + size_ms:  # every reading in one window
            values, stamps = columns.values(metric)
            return {prefix + str(start): (values, stamps)} if values else {}
        for r in batch.readings:
            value = r.metrics.get(metric)
            if value is None:
                continue
            ts = r.ts_ms
            start = ts - ts % size_ms
            if start != last_start:
                last_start, key = start, prefix + str(start)
                lists = out.get(key) or out.setdefault(key, ([], []))
            lists[0].append(value)
            lists[1].append(ts)
        return out
    agg = plan.agg  # impact: one window over the experiment's span, both groups
    period = agg.period(columns.oldest)
    if period is not None and agg.period(columns.newest) == period:  # a period is an interval: all in it
        values, stamps = columns.values(metric)
        key = window_key(batch.experiment_id, IMPACT_GROUP, agg.window_size_s, agg.window_start_ms)
        return {key: (values, stamps)} if values else {}
    for r in batch.readings:
        value = r.metrics.get(metric)
        if value is None or agg.period(r.ts_ms) is None:
            continue
        if lists is None:
            key = window_key(batch.experiment_id, IMPACT_GROUP, agg.window_size_s, agg.window_start_ms)
            lists = out[key] = ([], [])
        lists[0].append(value)
        lists[1].append(r.ts_ms)
    return out


def kpi_values(
    experiment: Experiment, touched: dict[str, set[str]], load: Callable[[str], dict[str, WindowState] | None]
) -> list[KpiValue]:
    """The current value of every touched KPI window (``apply_batch``'s result, or the union
    of several)."""
    aggs = aggregators_of(experiment)
    by_name = {k.name: k for k in experiment.kpis}
    out = []
    for k, names in touched.items():
        exp_id, group, size, start = k.rsplit("|", 3)
        window = load(k) or {}
        for name in sorted(names):
            state, kpi = window.get(name), by_name.get(name)
            if state is None or kpi is None or state["k"] != kpi.signature():
                continue  # the manifest changed since
            value, details = aggs[name].result(state["s"], group)
            out.append(
                KpiValue(
                    experiment_id=exp_id,
                    kpi=name,
                    metric=kpi.metric,
                    kind=kpi.kind,
                    device_group=group,
                    window_size_s=int(size),
                    window_start_ms=int(start),
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
    ts, metrics = reading.ts_ms, reading.metrics
    ends = [
        window_start(ts, window) + window * 1000 for metric, window in made_of(experiment).closing if metric in metrics
    ]
    return (min(ends) if ends else ts) + lateness_ms


def split_late(
    batch: ReadingBatch, experiment: Experiment, watermark_ms: int | None
) -> tuple[ReadingBatch, tuple[Reading, ...]]:
    """Readings still within lateness (they revise their windows) and readings past it.
    ``watermark_ms`` is the newest ``ts`` of the experiment seen before this batch."""
    if watermark_ms is None:
        return batch, ()
    # closes_at(r) ≥ r.ts_ms + lateness: a batch whose oldest reading is that recent has none late
    if not batch.readings or min(r.ts_ms for r in batch.readings) + experiment.lateness * 1000 > watermark_ms:
        return batch, ()
    on_time, late = [], []
    for r in batch.readings:
        (late if closes_at(r, experiment) <= watermark_ms else on_time).append(r)
    if not late:
        return batch, ()
    kept = ReadingBatch(batch.experiment_id, batch.device_id, batch.group, batch.received_ms, tuple(on_time))
    return kept, tuple(late)


FIRST_REPORT = "first report"  # the detail of a device's first "online" (not a return)


def advance(
    state: dict | None, batch: ReadingBatch, experiment: Experiment
) -> tuple[dict, list[DeviceStatus]]:
    """Move the experiment's event-time state on by one (screened) batch; updates ``state``
    in place and returns it with the transitions.

    State: ``{"wm": newest ts seen, "dev": {device: [last ts seen, "online"|"offline"]},
    "due": a lower bound of the time the next online device falls silent}``. A device's first
    batch reports it online at that batch's oldest ``ts`` ("first report", also when this copy
    of the registry does not list the device yet), so a device that reported has a status and
    "online" has one definition, here; a device seen again after being offline is reported
    online at that reading's ``ts``; any online device
    whose last reading is ``offline_after`` of its intervals behind the watermark is reported
    offline at ``last + offline_after · interval``. Liveness runs in event time, so replays and
    out-of-order delivery give the same going offline and coming back (a first report's ``ts``
    is that of the first batch taken: a replay of the same log takes the same one; a worker
    whose state was lost and that starts past deleted offsets reports it again, later). The
    devices are only scanned when the watermark passes ``due``."""
    st = state if state is not None else {"wm": None, "dev": {}, "due": None}
    devices = st["dev"]
    events: list[DeviceStatus] = []
    if batch.readings:
        newest = max(r.ts_ms for r in batch.readings)
        last, status = devices.get(batch.device_id, (None, None))
        if status == "offline" and newest > last:
            events.append(
                DeviceStatus(batch.experiment_id, batch.device_id, "online", newest, last, "reporting again")
            )
            status = None
        if last is None:  # its first batch (ingest authorised it, whatever this registry copy lists yet)
            first = min(r.ts_ms for r in batch.readings)
            events.append(DeviceStatus(batch.experiment_id, batch.device_id, "online", first, newest, FIRST_REPORT))
        if status is None:  # new or back: it may fall silent before the current bound
            device = experiment.device(batch.device_id)
            if device is not None:
                silent_at = newest + experiment.offline_after * device.interval * 1000
                st["due"] = silent_at if st.get("due") is None else min(st["due"], silent_at)
            status = "online"
        devices[batch.device_id] = [newest if last is None else max(last, newest), status]
        st["wm"] = newest if st["wm"] is None else max(st["wm"], newest)
    wm, due = st["wm"], st.get("due")
    if wm is not None and (due is None or due <= wm):
        due = None
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
            else:
                due = silent_at if due is None else min(due, silent_at)
        st["due"] = due
    return st, events


@dataclass(frozen=True, slots=True)
class Screened:
    """A batch after de-duplication: what to count, and what was held back and why."""

    fresh: ReadingBatch
    duplicates: int
    too_late: tuple[Reading, ...]


DEDUP_MEMORY = 512  # instants remembered per device (see ``screen``)


def screen(
    batch: ReadingBatch, seen: dict | None, horizon_ms: int, memory: int = DEDUP_MEMORY
) -> tuple[Screened, dict]:
    """Drop readings already counted (same device, metric and ``ts``: the natural key storage
    uses too) and hold back readings the screen can no longer tell from a duplicate: older
    than the device's newest ``ts`` minus the horizon, or at or below the newest instant it
    has forgotten.

    ``seen`` is the device's state, updated in place and kept compact because every chunk
    rewrites it: ``{"hwm": newest ts, "t": [instants seen, ascending], "u": the device's usual
    metrics, "x": {ts: metrics} for instants whose metrics differ from "u", "floor": newest
    instant forgotten, "pruned": horizon floor of the last pruning}``. It remembers at most
    ``memory`` instants (forgetting the oldest, a quarter at a time) and none beyond the
    horizon (pruned whenever the horizon has moved on by a quarter): a device reporting every
    minute keeps its whole 6-hour horizon with the default 512; a device reporting ten times
    a second remembers its last ~50 s."""
    state = seen if seen is not None else {"hwm": None, "t": [], "u": None, "x": {}}
    if "seen" in state:  # the earlier {ts: metrics} form, from an older changelog
        old = state.pop("seen")
        state.update(t=sorted(int(k) for k in old), u=None, x=old)
    hwm, forgotten = state["hwm"], state.get("floor")
    instants: list[int] = state["t"]
    odd: dict[str, list[str]] = state["x"]
    usual = state["u"]
    usual_set = set(usual) if usual is not None else None
    fresh: list[Reading] = []
    late: list[Reading] = []
    duplicates = 0
    readings = batch.readings
    if all_new(readings, instants, hwm, forgotten):  # the usual message: nothing to look up per reading
        instants.extend(r.ts_ms for r in readings)
        if usual is None:
            usual = state["u"] = sorted(readings[0].metrics)
            usual_set = set(usual)
        for r in readings:
            if r.metrics.keys() != usual_set:
                odd[str(r.ts_ms)] = list(r.metrics)
        fresh = list(readings)
        hwm = readings[-1].ts_ms
        readings = ()  # all screened
    for r in readings:
        ts = r.ts_ms
        if (hwm is not None and ts <= hwm - horizon_ms) or (forgotten is not None and ts <= forgotten):
            late.append(r)
            continue
        i = bisect_left(instants, ts)
        if i == len(instants) or instants[i] != ts:  # a new instant
            instants.insert(i, ts)
            if usual is None:
                usual = state["u"] = sorted(r.metrics)
                usual_set = set(usual)
            if r.metrics.keys() != usual_set:
                odd[str(ts)] = list(r.metrics)
            fresh.append(r)
        else:
            already = odd.get(str(ts), usual)
            new_metrics = {m: v for m, v in r.metrics.items() if m not in already}
            duplicates += len(r.metrics) - len(new_metrics)
            if not new_metrics:
                continue
            odd[str(ts)] = [*already, *new_metrics]
            fresh.append(Reading(r.seq, ts, new_metrics))
        hwm = ts if hwm is None else max(hwm, ts)
    state["hwm"] = hwm
    cut = 0
    if hwm is not None:
        floor = hwm - horizon_ms
        if floor - state.get("pruned", floor - horizon_ms) >= horizon_ms // 4:
            cut = bisect_right(instants, floor)
            state["pruned"] = floor
    if len(instants) - cut > memory + memory // 4:
        cut = len(instants) - memory
        state["floor"] = instants[cut - 1] if forgotten is None else max(forgotten, instants[cut - 1])
    if cut:
        state["t"] = instants[cut:]
        if odd:
            oldest = state["t"][0] if state["t"] else hwm
            state["x"] = {k: v for k, v in odd.items() if int(k) >= oldest}
    screened = Screened(
        fresh=ReadingBatch(
            batch.experiment_id, batch.device_id, batch.group, batch.received_ms, tuple(fresh)
        ),
        duplicates=duplicates,
        too_late=tuple(late),
    )
    return screened, state


def all_new(readings: tuple[Reading, ...], instants: list[int], hwm: int | None, forgotten: int | None) -> bool:
    """Whether ``screen``'s loop would take every reading as a new instant, appended in turn:
    readings in strictly ascending ``ts``, the first newer than every instant remembered, the
    newest seen and the newest forgotten (so none is late either)."""
    if not readings:
        return False
    first = readings[0].ts_ms
    if (hwm is not None and first <= hwm) or (forgotten is not None and first <= forgotten):
        return False
    if instants and first <= instants[-1]:
        return False
    return all(a.ts_ms < b.ts_ms for a, b in pairwise(readings))


# --- one message through the whole engine ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Step:
    """What one message did: the KPI windows it changed, and what to send besides."""

    touched: dict[str, set[str]]
    late: tuple[Reading, ...]
    transitions: list[DeviceStatus]


def step(
    batch: ReadingBatch,
    experiment: Experiment,
    get: Callable[[str], object],
    put: Callable[[str, object], None],
    *,
    horizon_ms: int,
    memory: int = DEDUP_MEMORY,
) -> Step:
    """One Kafka message through the engine, on one key-value state: the device's
    de-duplication state ``d|device``, the windows ``w|window`` and the experiment clock
    ``x|experiment`` (watermark and liveness). Deterministic: the same messages in the same
    order from the same state give the same states and outputs (what makes a replay after a
    crash safe; see ``streams.checkpoint``)."""

    device_key, clock_key = f"d|{batch.device_id}", f"x|{batch.experiment_id}"
    screened, seen = screen(batch, get(device_key), horizon_ms, memory)
    put(device_key, seen)
    clock = get(clock_key)
    on_time, past_lateness = split_late(screened.fresh, experiment, clock["wm"] if clock else None)
    touched = apply_batch(on_time, experiment, window_loader(get), lambda k, window: put("w|" + k, window))
    clock, transitions = advance(clock, screened.fresh, experiment)
    put(clock_key, clock)
    return Step(touched, (*screened.too_late, *past_lateness), transitions)


def window_loader(get: Callable[[str], object]) -> Callable[[str], dict | None]:
    return lambda k: get("w|" + k)

