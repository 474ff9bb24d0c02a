"""pilotlab end to end on the embedded stack, in one run: MQTT publish → row in ``readings``
and → KPI row in ``kpi_values``, against the raw ceilings of the same brokers and database
and against peers doing the same job on the same box.

    python bench/bench_e2e.py [--quick] [--phases ceilings,fixed,step,saturation,peers]

Workload (the shared contract, bench/e2e/load.py): experiment ``bench-e2e`` with D devices
(half treatment, half control); each MQTT message (QoS 1) is a JSON array of R readings of
pm25, pm10 and no2 (3R datapoints); the last reading's ``ts`` is the publish time. KPIs: a
1-minute ``count`` of pm25 (its summed ``sample_count`` tells how far the KPIs are), a mean,
a p95 quantile and an impact KPI.

Phases (each on the same stack, one after the other):
- ceilings: raw Mosquitto pub→sub, raw Kafka produce and consume (bench/bench_ingest.py's
  functions plus a consumer), PostgreSQL raw COPY of the same rows and the sink's own
  write path (storage.writer; bench/bench_sink.py), in a scratch database;
- fixed: 1,000 and 10,000 datapoints/s for a fixed time: latency publish → stored
  (``readings.stored_at - ts`` of each message's last reading) p50/p95/p99; KPI lag (the
  count KPI polled every 200 ms against the publish timeline: the age of the oldest
  published message the KPIs do not count yet) p50/p95/p99; CPU per process (cores busy);
- saturation (run before the step load, so that it starts, like each peer's, from a table and
  a broker holding little): N datapoints published as fast as possible: first publish → last
  row stored, and → KPI counts complete;
- step: rising rates until the pipeline falls behind (stored rate < 95% of the offered rate,
  or latency growing > 1 s from the first to the last quarter of the step, or not drained);
  sustained throughput = the highest step kept up, to ``readings`` and to ``kpi_values``;
- peers: the same saturation workload and the 1,000 datapoints/s latency run against each
  peer of bench/peers (Node-RED per message and batched, paho → per-message INSERT). With
  both saturation and peers asked for, the bursts alternate by round (pilotlab's k-th burst,
  then each peer's k-th, pilotlab's services stopped meanwhile and restarted after), so that
  load from other programs on a shared box falls on both sides of each ratio alike; the step
  load then runs after the last round, on services started again.

Kafka storage (``--kafka-storage``, default ``both``): every phase runs on the broker's memory
storage, then a second stack with durable storage (tansu's s3:// engine on the local object
server, what `pilotlab stack up` runs) repeats the last fixed load and the saturation run, so
the two modes stand side by side in one report. The report opens with the run measured
against the efficiency goals (``TARGETS``).

Writes ``bench/results/e2e-<UTC>.json`` and ``.md`` (with machine info), each run's figures
once, and ``latest.md``, a pointer to them; prints the markdown. ``--quick`` is a 1-3 minute
smoke run of tiny loads (written as ``e2e-quick-<UTC>.*``, pointed at by ``latest-quick.md``).
The machine is measured as a whole too: the CPU table's "not tracked" column is what other
programs on the box used meanwhile.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import bench_ingest, bench_sink  # noqa: E402
from bench.e2e.cpu import CpuMeter  # noqa: E402
from bench.e2e.kafka_requests import RequestCounter  # noqa: E402
from bench.e2e.load import EXPERIMENT, METRICS, device_ids, payload, read_times  # noqa: E402
from control.services import Services  # noqa: E402
from control.stack import (  # noqa: E402
    KAFKA_STORAGE,
    Stack,
    StackState,
    find_mosquitto,
    find_postgres_bindir,
    find_tansu,
    postgres_admin_connect,
)
from pilotlab import registry  # noqa: E402
from pilotlab.contracts import Reading, ReadingBatch, telemetry_topic, to_ms, utcnow  # noqa: E402
from pilotlab.credentials import MqttEndpoint  # noqa: E402
from pilotlab.kafka_admin import ensure_topics  # noqa: E402
from pilotlab.manifest import Experiment  # noqa: E402
from storage import writer  # noqa: E402
from storage.migrate import migrate  # noqa: E402

PHASES = ("ceilings", "fixed", "step", "saturation", "peers")
COUNT_KPI = "pm25_count"
RESULTS = ROOT / "bench" / "results"
LOAD = ROOT / "bench" / "e2e" / "load.py"
RAW_TOPIC = "pilotlab.bench-raw"


# --- configuration -------------------------------------------------------------------------


@dataclass
class Config:
    devices: int = 200
    readings: int = 10
    fixed_rates: tuple[int, ...] = (1000, 10000)
    fixed_s: float = 40.0
    steps: tuple[int, ...] = (2000, 5000, 10000, 20000, 30000, 40000, 50000, 60000, 70000, 80000)
    step_s: float = 20.0
    saturation_datapoints: int = 600_000
    # saturation runs per system (pilotlab and each peer), the median reported: one burst of a
    # few seconds on a shared box moves by 10-20% from run to run, and a ratio of two single
    # runs by more
    saturation_repeats: int = 3
    saturation_timeout_s: float = 240.0
    peer_saturation_timeout_s: float = 90.0
    ceiling_messages: int = 20_000
    copy_rows: int = 300_000
    drain_timeout_s: float = 60.0
    budget_s: float = 20 * 60  # step load stops early when the run would not fit in 20 min
    quick: bool = False

    @property
    def per_message(self) -> int:
        return self.readings * len(METRICS)


def quick_config() -> Config:
    return Config(
        devices=20,
        fixed_rates=(1000,),
        fixed_s=8.0,
        steps=(1000, 3000),
        step_s=6.0,
        saturation_datapoints=15_000,
        saturation_repeats=1,
        saturation_timeout_s=90.0,
        peer_saturation_timeout_s=60.0,
        ceiling_messages=2000,
        copy_rows=30_000,
        drain_timeout_s=45.0,
        quick=True,
    )


def experiment(devices: int) -> Experiment:
    now = utcnow().replace(microsecond=0)
    return Experiment.model_validate(
        {
            "id": EXPERIMENT,
            "title": "end-to-end benchmark",
            "startup": "bench",
            "district": "bench",
            "location": {"lat": 45.07, "lon": 7.68},
            "periods": {
                "baseline": {
                    "start": (now - timedelta(days=8)).isoformat(),
                    "end": (now - timedelta(days=1)).isoformat(),
                },
                "intervention": {
                    "start": (now - timedelta(days=1)).isoformat(),
                    "end": (now + timedelta(days=1)).isoformat(),
                },
            },
            "devices": [
                {"id": d, "kind": "air_quality", "interval": "1m", "group": "treatment" if i % 2 == 0 else "control"}
                for i, d in enumerate(device_ids(devices))
            ],
            "kpis": [
                {"name": COUNT_KPI, "metric": "pm25", "kind": "count", "window": "1m", "better": "higher"},
                {"name": "no2_mean", "metric": "no2", "kind": "mean", "window": "1m"},
                {"name": "pm10_p95", "metric": "pm10", "kind": "quantile", "q": 0.95, "window": "1m"},
                {"name": "no2_impact", "metric": "no2", "kind": "impact"},
            ],
        }
    )


# --- small statistics ------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float | None:
    """Linear-interpolated quantile (numpy's default), None for no values."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def pcts(values: list[float]) -> dict:
    return {
        "p50": pct(values, 0.5),
        "p95": pct(values, 0.95),
        "p99": pct(values, 0.99),
        "max": max(values) if values else None,
        "n": len(values),
    }


def middle_rate(sorted_times: list[float], per_item: int) -> float | None:
    """Items/s × per_item between the 10th and the 90th percentile of the items' times."""
    n = len(sorted_times)
    if n < 10:
        return None
    i, j = n // 10, (9 * n) // 10
    dt = sorted_times[j] - sorted_times[i]
    return (j - i) * per_item / dt if dt > 0 else None


def quarters_p50(pairs: list[tuple[float, float]]) -> tuple[float | None, float | None]:
    """p50 of the values in the first and in the last quarter of (time, value) pairs by time."""
    if len(pairs) < 8:
        return None, None
    s = sorted(pairs)
    q = len(s) // 4
    return pct([v for _, v in s[:q]], 0.5), pct([v for _, v in s[-q:]], 0.5)


# --- the KPI poller --------------------------------------------------------------------------


class KpiPoller:
    """Polls the summed ``sample_count`` of the count KPI every ``every`` s in a thread."""

    def __init__(self, url: str, every: float = 0.2) -> None:
        self.url = url
        self.every = every
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def count(self, conn: psycopg.Connection) -> int:
        return int(
            conn.execute(
                "SELECT coalesce(sum(sample_count), 0) FROM kpi_values WHERE experiment_id = %s AND kpi = %s",
                (EXPERIMENT, COUNT_KPI),
            ).fetchone()[0]
        )

    def _run(self) -> None:
        try:
            with psycopg.connect(self.url, autocommit=True) as conn:
                while not self._stop.is_set():
                    self.samples.append((time.time(), self.count(conn)))
                    self._stop.wait(self.every)
        except psycopg.Error as exc:  # reported by stop(), not swallowed
            self.error = exc

    def start(self) -> KpiPoller:
        self._thread = threading.Thread(target=self._run, name="kpi-poller", daemon=True)
        self._thread.start()
        return self

    def latest(self) -> int:
        return self.samples[-1][1] if self.samples else -1

    def stop(self) -> list[tuple[float, int]]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if self.error is not None:
            raise RuntimeError(f"KPI poller failed: {self.error}") from self.error
        return self.samples


def kpi_progress(samples: list[tuple[float, int]], c0: int, times, per_msg_pm25: int, total: int) -> dict:
    """KPI lag samples (age of the oldest published message not yet counted), when the first
    and the last message were counted, and the growth of the lag over the run."""
    lags: list[tuple[float, float]] = []
    first_counted = complete_at = t10 = t90 = None
    for t, c in samples:
        counted = max(0, c - c0)
        if counted > 0 and first_counted is None:
            first_counted = t
        if counted >= 0.1 * total and t10 is None:
            t10 = t
        if counted >= 0.9 * total and t90 is None:
            t90 = t
        if counted >= total and complete_at is None:
            complete_at = t
        if not times or t < times[0] or complete_at is not None:
            continue
        k = counted // per_msg_pm25  # messages fully counted (messages are counted in order, roughly)
        published = bisect.bisect_right(times, t)
        lags.append((t, t - times[k] if k < published else 0.0))
    first_q, last_q = quarters_p50([(t, v) for t, v in lags if t <= times[-1]]) if times else (None, None)
    return {
        "lag_s": pcts([v for _, v in lags]),
        "first_counted": first_counted,
        "complete_at": complete_at,
        "t10": t10,  # when 10% / 90% of the run's datapoints were counted
        "t90": t90,
        "counted": max(0, samples[-1][1] - c0) if samples else 0,
        "expected": total,
        "lag_p50_first_quarter_s": first_q,
        "lag_p50_last_quarter_s": last_q,
    }


# --- the bench context -------------------------------------------------------------------------


@dataclass
class Bench:
    cfg: Config
    state: StackState
    tmp: Path
    services: Services | None = None
    seq_next: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    t0: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    @contextlib.contextmanager
    def timed(self, name: str, banner: str | None = None):
        """Time the block into ``timings[name]`` (when it finishes), announcing it first."""
        if banner:
            print(banner, flush=True)
        t = time.monotonic()
        yield
        self.timings[name] = time.monotonic() - t

    def cpu_roots(self, publisher_pid: int | None) -> dict[str, int]:
        roots: dict[str, int] = {}
        if self.services is not None:
            roots.update({name: p.pid for name, p in self.services.procs.items()})
        roots["mosquitto"] = self.state.services["mqtt"].pid
        roots["tansu"] = self.state.services["kafka"].pid
        if "objects" in self.state.services:  # the durable broker's object server
            roots["objects"] = self.state.services["objects"].pid
        roots["postgres"] = self.state.services["postgres"].pid
        if publisher_pid is not None:
            roots["publisher"] = publisher_pid
        return roots

    @property
    def kafka_port(self) -> int:
        return self.state.services["kafka"].port

    def next_seq_base(self, messages: int) -> int:
        base = self.seq_next
        r = self.cfg.readings
        self.seq_next = base + ((messages * r) // (r * 1000) + 1) * r * 1000
        return base

    def publish(self, name: str, *, rate: float, duration: float = 0.0, datapoints: int = 0) -> tuple:
        """Start the load generator as a child process; returns (process, result path, times path, seq base)."""
        est = round(rate * duration / self.cfg.per_message) + 1 if rate > 0 else datapoints // self.cfg.per_message
        base = self.next_seq_base(est)
        out, times = self.tmp / f"{name}.json", self.tmp / f"{name}.times"
        argv = [
            sys.executable,
            str(LOAD),
            "--mqtt-url",
            self.state.mqtt_url,
            "--devices",
            str(self.cfg.devices),
            "--readings",
            str(self.cfg.readings),
            "--seq-base",
            str(base),
            "--out",
            str(out),
            "--times",
            str(times),
        ]
        argv += ["--rate", str(rate), "--duration", str(duration)] if rate > 0 else ["--datapoints", str(datapoints)]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(self.tmp / f"{name}.err", "wb"))  # noqa: SIM115
        return proc, out, times, base

    def wait_publisher(self, proc: subprocess.Popen, name: str, timeout: float) -> None:
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise TimeoutError(f"load generator {name} did not finish within {timeout:.0f} s") from None
        if rc != 0:
            err = (self.tmp / f"{name}.err").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"load generator {name} exited with {rc}: {err}")


# --- one pilotlab load run ---------------------------------------------------------------------


@dataclass(frozen=True)
class Span:
    """The rows of one load run: its ts window (epoch s) and seq range, in ``table``."""

    t0: float
    t1: float
    seq0: int
    seq1: int
    table: str = "readings"

    def where(self) -> sql.Composable:
        exp = "experiment_id = %(exp)s AND " if self.table == "readings" else ""
        return sql.SQL(exp + "ts BETWEEN %(t0)s AND %(t1)s AND seq >= %(s0)s AND seq < %(s1)s")

    def args(self, **extra) -> dict:
        t0, t1 = datetime.fromtimestamp(self.t0 - 1, UTC), datetime.fromtimestamp(self.t1 + 300, UTC)
        return {"exp": EXPERIMENT, "t0": t0, "t1": t1, "s0": self.seq0, "s1": self.seq1, **extra}


def phase_rows(conn: psycopg.Connection, span: Span) -> int:
    """Rows of one load run (all metrics)."""
    q = sql.SQL("SELECT count(*) FROM {} WHERE metric = ANY(%(m)s) AND {}").format(
        sql.Identifier(span.table), span.where()
    )
    return int(conn.execute(q, span.args(m=list(METRICS))).fetchone()[0])


@dataclass(frozen=True)
class LastMessage:
    """The run's last message: its device, the seq of its last reading, and a lower bound of its
    ``ts`` (the publisher stamps a message at or after its publish time)."""

    device_id: str
    seq: int
    ts_from: datetime

    @classmethod
    def of(cls, load: dict, cfg: Config, seq0: int) -> LastMessage:
        i = load["messages"] - 1
        return cls(
            device_id=device_ids(cfg.devices)[i % cfg.devices],
            seq=seq0 + i * cfg.readings + cfg.readings - 1,
            ts_from=datetime.fromtimestamp(load["last_publish"] - 1, UTC),
        )

    def stored(self, conn: psycopg.Connection, span: Span) -> bool:
        """Its last pm25 reading is in the run's table: a primary-key range of one device."""
        q = sql.SQL("SELECT 1 FROM {} WHERE device_id = %s AND metric = 'pm25' AND ts >= %s AND seq = %s").format(
            sql.Identifier(span.table)
        )
        return conn.execute(q, (self.device_id, self.ts_from, self.seq)).fetchone() is not None


def last_reading_latencies(conn: psycopg.Connection, span: Span, readings: int) -> list[tuple]:
    """(ts, stored_at, stored_at - ts, received_at or None) in epoch seconds of each message's last
    pm25 reading (``received_at``: when ingest took the message; ``readings`` only)."""
    received = "extract(epoch FROM received_at)::float8" if span.table == "readings" else "NULL::float8"
    q = sql.SQL(
        "SELECT extract(epoch FROM ts)::float8, extract(epoch FROM stored_at)::float8, {} FROM {}"
        " WHERE metric = 'pm25' AND {} AND seq %% %(r)s = %(r)s - 1"
    ).format(sql.SQL(received), sql.Identifier(span.table), span.where())
    rows = conn.execute(q, span.args(r=readings)).fetchall()
    missing = sum(1 for _, st, _ in rows if st is None)
    if missing:
        raise AssertionError(f"{missing} rows of {span.table} have no stored_at")
    return [(ts, st, st - ts, rc) for ts, st, rc in rows]


def run_load(
    b: Bench,
    name: str,
    *,
    rate: float,
    duration: float = 0.0,
    datapoints: int = 0,
    drain_timeout: float,
    with_kpis: bool = True,
    table: str = "readings",
    services_check=None,
    extra_roots: dict[str, int] | None = None,
) -> dict:
    """Publish one load, wait until stored (and counted by the KPIs), measure everything."""
    cfg = b.cfg
    url = b.state.database_url
    t_start = time.monotonic()
    with psycopg.connect(url, autocommit=True) as conn:
        poller = KpiPoller(url) if with_kpis else None
        c0 = poller.count(conn) if poller else 0
        if poller:
            poller.start()
        proc, out, times_path, seq0 = b.publish(name, rate=rate, duration=duration, datapoints=datapoints)
        roots = {**b.cpu_roots(proc.pid), **(extra_roots or {})}
        meter = CpuMeter(roots).start()
        requests = RequestCounter(b.kafka_port, roots).start()
        try:
            b.wait_publisher(proc, name, timeout=(duration or 0) + 600)
            load = json.loads(out.read_text())
            times = read_times(times_path)
            n_msgs, n_dp = load["messages"], load["datapoints"]
            span = Span(load["first_publish"], load["last_publish"], seq0, seq0 + n_msgs * cfg.readings, table)
            expected_kpi = n_msgs * cfg.readings  # pm25 readings
            deadline = time.monotonic() + drain_timeout
            stored = 0
            last = LastMessage.of(load, cfg, seq0)
            while True:
                if services_check is not None:
                    services_check()
                # the full count scans every row of the run (~0.3 s of database CPU per million):
                # only once the last message is in, not on every poll of the drain
                if stored < n_dp and last.stored(conn, span):
                    stored = phase_rows(conn, span)
                kpis_done = poller is None or poller.latest() - c0 >= expected_kpi
                if (stored >= n_dp and kpis_done) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            if stored < n_dp:
                stored = phase_rows(conn, span)
            drained_at = time.time()
        finally:
            # the load generator has exited: it reported its own CPU
            done = json.loads(out.read_text()) if out.exists() else {}
            cpu = meter.stop({"publisher": done["cpu_s"]} if "cpu_s" in done else None)
            kafka_requests = requests.stop()
            samples = poller.stop() if poller else []
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        lat = last_reading_latencies(conn, span, cfg.readings)
    lat_values = [v for _, _, v, _ in lat]
    first_q, last_q = quarters_p50([(ts, v) for ts, _, v, _ in lat])
    stored_times = sorted(st for _, st, _, _ in lat)
    span_pub = load["last_publish"] - load["first_publish"]
    res = {
        "name": name,
        "load": load,
        "published_datapoints": n_dp,
        "stored_datapoints": stored,
        "all_stored": stored == n_dp,
        "offered_datapoints_per_s": load["achieved_datapoints_per_s"],
        "latency_s": pcts(lat_values),
        # the two legs: publish → ingest took the message (received_at), and → stored
        "latency_to_ingest_s": pcts([rc - ts for ts, _, _, rc in lat if rc is not None]),
        "latency_ingest_to_stored_s": pcts([st - rc for _, st, _, rc in lat if rc is not None]),
        "latency_p50_first_quarter_s": first_q,
        "latency_p50_last_quarter_s": last_q,
        # the rate rows arrived at, from the 10th to the 90th percentile of the messages' stored_at
        # (start-up and tail effects excluded: a constant latency cancels out)
        "stored_datapoints_per_s": middle_rate(stored_times, cfg.per_message),
        "first_publish_to_last_stored_s": (stored_times[-1] - load["first_publish"]) if stored_times else None,
        "publish_span_s": span_pub,
        "cpu": {**cpu, "us_per_datapoint": us_per_datapoint(cpu, n_dp)},
        "kafka_requests": kafka_requests,
        "wall_s": round(time.monotonic() - t_start, 2),
        "drained_at": drained_at,
        "drained_after_last_publish_s": drained_at - load["last_publish"],
    }
    if poller:
        kp = kpi_progress(samples, c0, list(times), cfg.readings, expected_kpi)
        res["kpi"] = kp
        res["kpis_complete"] = kp["counted"] >= expected_kpi
        t10, t90 = kp["t10"], kp["t90"]
        res["kpi_datapoints_per_s"] = 0.8 * n_dp / (t90 - t10) if t10 and t90 and t90 > t10 else None
        res["first_publish_to_kpis_complete_s"] = (
            kp["complete_at"] - load["first_publish"] if kp["complete_at"] else None
        )
    return res


def us_per_datapoint(cpu: dict, datapoints: int) -> dict[str, float]:
    """CPU µs per published datapoint of each measured process (and the whole machine) over the
    run: from publish start to drained, so a process's idle cost is spread over the datapoints."""
    if datapoints <= 0:
        return {}
    out = {k: round(v * 1e6 / datapoints, 2) for k, v in cpu["cpu_s"].items()}
    out["machine"] = round(cpu["machine_cores_busy"] * cpu["wall_s"] * 1e6 / datapoints, 2)
    return out


def kept_up(run: dict, key: str) -> bool:
    """Readings (``stored``) or KPIs (``kpi``) kept up with the offered rate."""
    offered = run["offered_datapoints_per_s"]
    if key == "stored":
        rate, done = run["stored_datapoints_per_s"], run["all_stored"]
        first, last = run["latency_p50_first_quarter_s"], run["latency_p50_last_quarter_s"]
    else:
        rate, done = run.get("kpi_datapoints_per_s"), run.get("kpis_complete", False)
        first, last = run["kpi"]["lag_p50_first_quarter_s"], run["kpi"]["lag_p50_last_quarter_s"]
    if not done or rate is None:
        return False
    growing = first is not None and last is not None and last - first > 1.0
    return rate >= 0.95 * offered and not growing


# --- phases ----------------------------------------------------------------------------------


def contract_messages(cfg: Config, n: int) -> list[tuple[str, bytes]]:
    now = to_ms(utcnow())
    ids = device_ids(cfg.devices)
    return [
        (
            telemetry_topic(EXPERIMENT, ids[i % len(ids)]),
            payload(i * cfg.readings, now + i * cfg.readings, cfg.readings),
        )
        for i in range(n)
    ]


def contract_batches(cfg: Config, n: int) -> list[ReadingBatch]:
    """What ingest forwards for n contract messages (the rows the sink writes)."""
    t0 = to_ms(utcnow() - timedelta(days=2))
    ids = device_ids(cfg.devices)
    out = []
    for i in range(n):
        last = t0 + i * cfg.readings
        rs = tuple(
            Reading(
                i * cfg.readings + j,
                last - (cfg.readings - 1 - j),
                {"pm25": 8.0 + j * 0.5, "pm10": 15.0 + j, "no2": 20.0 + j * 0.75},
            )
            for j in range(cfg.readings)
        )
        out.append(ReadingBatch(EXPERIMENT, ids[i % len(ids)], "treatment" if i % 2 == 0 else "control", last, rs))
    return out


def raw_kafka_consume(bootstrap: str, n: int) -> float:
    """Records/s of one consumer reading ``n`` records of RAW_TOPIC from the beginning
    (assigned partitions, no group join): assign → n-th record."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition  # noqa: PLC0415

    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-raw-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 10,
        }
    )
    try:
        parts = c.list_topics(RAW_TOPIC, timeout=10).topics[RAW_TOPIC].partitions
        start = time.perf_counter()
        c.assign([TopicPartition(RAW_TOPIC, p, OFFSET_BEGINNING) for p in parts])
        got, deadline = 0, time.monotonic() + 120
        while got < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"raw Kafka consume: {got}/{n} records")
            for m in c.consume(1000, 0.5):
                if m.error() is None:
                    got += 1
        return n / (time.perf_counter() - start)
    finally:
        c.close()


def phase_ceilings(b: Bench) -> dict:
    cfg = b.cfg
    from confluent_kafka.admin import AdminClient, NewTopic  # noqa: PLC0415

    ep = MqttEndpoint.parse(b.state.mqtt_url)
    n = cfg.ceiling_messages
    msgs = contract_messages(cfg, n)
    out: dict = {"messages": n, "datapoints_per_message": cfg.per_message}
    t = time.monotonic()
    out["mqtt_pubsub_msgs_per_s"] = bench_ingest.raw_mqtt(ep, msgs)
    admin = AdminClient({"bootstrap.servers": b.state.kafka_bootstrap})
    admin.create_topics([NewTopic(RAW_TOPIC, 4, 1)])[RAW_TOPIC].result(30)
    records = [bt.to_json() for bt in contract_batches(cfg, n)]
    out["kafka_record_bytes"] = len(records[0])
    out["kafka_produce_records_per_s"] = bench_ingest.raw_kafka(b.state.kafka_bootstrap, records)
    out["kafka_consume_records_per_s"] = raw_kafka_consume(b.state.kafka_bootstrap, n)
    admin.delete_topics([RAW_TOPIC])[RAW_TOPIC].result(30)
    out.update(postgres_ceilings(b))
    for k in ("mqtt_pubsub", "kafka_produce", "kafka_consume"):
        unit = "msgs" if k == "mqtt_pubsub" else "records"
        out[f"{k}_datapoints_per_s"] = out[f"{k}_{unit}_per_s"] * cfg.per_message
    out["wall_s"] = round(time.monotonic() - t, 1)
    return out


def postgres_ceilings(b: Bench) -> dict:
    """Raw COPY (bench_sink.via_raw_copy) and the sink's write path (storage.writer) of the same
    rows into a scratch database on the same server, in transactions of ~30,000 rows."""
    cfg = b.cfg
    url = b.state.database_url
    scratch = psycopg.conninfo.make_conninfo(url, dbname="pilotlab_bench_e2e")
    with psycopg.connect(url, autocommit=True) as c:
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier("pilotlab_bench_e2e")))
        c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier("pilotlab_bench_e2e")))
    try:
        migrate(scratch)
        batches = contract_batches(cfg, max(1, cfg.copy_rows // cfg.per_message))
        rows = len(batches) * cfg.per_message
        per = max(1, 30_000 // cfg.per_message)
        groups = [batches[k : k + per] for k in range(0, len(batches), per)]
        out = {"copy_rows": rows, "copy_rows_per_txn": per * cfg.per_message}
        with psycopg.connect(scratch, autocommit=True) as conn:
            for label, fn in (("postgres_raw_copy", bench_sink.via_raw_copy), ("postgres_sink_copy_merge", _merge)):
                conn.execute("TRUNCATE readings")
                start = time.perf_counter()
                for g in groups:
                    fn(conn, g)
                out[f"{label}_rows_per_s"] = rows / (time.perf_counter() - start)
                got = conn.execute("SELECT count(*) FROM readings").fetchone()[0]
                if got != rows:
                    raise AssertionError(f"{label}: {got} rows stored of {rows}")
        return out
    finally:
        with psycopg.connect(url, autocommit=True) as c:
            c.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier("pilotlab_bench_e2e")))


def _merge(conn: psycopg.Connection, group: list[ReadingBatch]) -> None:
    with conn.transaction():
        writer.write_readings(conn, group)


def wait_pipeline_idle(b: Bench, timeout: float = 120.0) -> dict:
    """Until the streams and sink consumer groups have nothing left to read, or ``timeout``:
    returns how long it waited and whether it got there (the next run then starts with a
    backlog, which its figures record)."""
    from pilotlab.contracts import KafkaTopics  # noqa: PLC0415
    from pilotlab.kafka_admin import lag_or_reason  # noqa: PLC0415
    from storage.sink import TOPICS as SINK_TOPICS  # noqa: PLC0415

    start = time.monotonic()
    while True:
        b.services.check_alive()
        s = lag_or_reason(b.state.kafka_bootstrap, "pilotlab-streams", (KafkaTopics.READINGS,))
        k = lag_or_reason(b.state.kafka_bootstrap, "pilotlab-sink", SINK_TOPICS)
        waited = round(time.monotonic() - start, 1)
        if s == 0 and k == 0:
            return {"idle": True, "waited_s": waited}
        if waited > timeout:
            print(f"  pipeline not idle after {timeout:.0f} s: lag streams {s}, sink {k} records", flush=True)
            return {"idle": False, "waited_s": waited, "lag_streams": s, "lag_sink": k}
        time.sleep(0.5)


def checkpoint(b: Bench) -> None:
    """A PostgreSQL CHECKPOINT before a saturation run, outside its measurement: otherwise the
    checkpoint that the earlier runs' WAL (about 0.3 GB per 600,000 rows) makes due lands in
    one run or another by chance and writes the tables' dirty pages during it — the same start
    for pilotlab's runs and every peer's."""
    with postgres_admin_connect(b.state) as conn:  # CHECKPOINT: the superuser (or pg_checkpoint) only
        conn.execute("CHECKPOINT")


def pipeline_run(b: Bench, name: str, **kw) -> dict:
    return run_load(b, name, services_check=b.services.check_alive, **kw)


def measure_idle(b: Bench, seconds: float) -> dict:
    """CPU per process with the services up and nothing published: the pipeline's idle cost
    (consumers polling the broker, timers), the baseline of the loaded figures."""
    roots = b.cpu_roots(None)
    meter = CpuMeter(roots).start()
    requests = RequestCounter(b.kafka_port, roots).start()
    time.sleep(seconds)
    return {"name": "idle (no load)", "cpu": meter.stop(), "kafka_requests": requests.stop()}


def phase_fixed(b: Bench) -> list[dict]:
    out = []
    for rate in b.cfg.fixed_rates:
        r = pipeline_run(b, f"fixed-{rate}", rate=rate, duration=b.cfg.fixed_s, drain_timeout=b.cfg.drain_timeout_s)
        out.append(r)
        print_run(r)
        r["idle_after"] = wait_pipeline_idle(b)
    return out


def phase_step(b: Bench, reserve_s: float) -> dict:
    steps = []
    first_fail: dict[str, int | None] = {"stored": None, "kpi": None}
    stopped_for_budget = None
    for rate in b.cfg.steps:
        if b.elapsed() + b.cfg.step_s + 30 > b.cfg.budget_s - reserve_s:
            print(f"  step load: stopping before {rate} dp/s to stay within the time budget")
            stopped_for_budget = rate
            break
        r = pipeline_run(b, f"step-{rate}", rate=rate, duration=b.cfg.step_s, drain_timeout=b.cfg.drain_timeout_s)
        r["kept_up_readings"] = kept_up(r, "stored")
        r["kept_up_kpis"] = kept_up(r, "kpi")
        steps.append(r)
        print_run(r)
        for key, flag in (("stored", r["kept_up_readings"]), ("kpi", r["kept_up_kpis"])):
            if not flag and first_fail[key] is None:
                first_fail[key] = rate
        if not r["load"]["kept_up"]:
            print("  step load: the load generator could not keep up; stopping")
            break
        if all(v is not None for v in first_fail.values()):
            break
        r["idle_after"] = wait_pipeline_idle(b, timeout=180)

    def sustained(key: str, flag: str) -> int | None:
        best = None
        for s in steps:
            if s[flag] and (first_fail[key] is None or s["load"]["target_datapoints_per_s"] < first_fail[key]):
                best = s["load"]["target_datapoints_per_s"]
        return best

    return {
        "steps": steps,
        "sustained_readings_datapoints_per_s": sustained("stored", "kept_up_readings"),
        "sustained_kpis_datapoints_per_s": sustained("kpi", "kept_up_kpis"),
        "first_step_behind_readings": first_fail["stored"],
        "first_step_behind_kpis": first_fail["kpi"],
        # the first step not run for want of time (None: every step ran or one fell behind)
        "stopped_for_budget": stopped_for_budget,
    }


def saturation_run(b: Bench, name: str, drain_timeout: float, **kw) -> dict:
    """One saturation burst of any system (pilotlab's or a peer's), from the same start: a
    checkpointed database, then ``saturation_datapoints`` as fast as the broker takes them."""
    checkpoint(b)
    r = saturation_figures(
        run_load(b, name, rate=0, datapoints=b.cfg.saturation_datapoints, drain_timeout=drain_timeout, **kw)
    )
    print_run(r)
    return r


def phase_saturation(b: Bench, n: int) -> list[dict]:
    """``n`` of pilotlab's saturation bursts, each from an idle pipeline."""
    runs = []
    for _ in range(n):
        before = wait_pipeline_idle(b, timeout=240)
        r = saturation_run(b, "saturation", b.cfg.saturation_timeout_s, services_check=b.services.check_alive)
        r["idle_before"] = before
        runs.append(r)
    return runs


REPEAT_FIGURES = ("readings_datapoints_per_s", "kpis_datapoints_per_s", "all_stored", "readings_rate_partial")


def median_saturation(runs: list[dict]) -> dict:
    """Several saturation runs of one system as one: its CPU, latency and requests are those of
    the run with the median throughput to stored rows (the lower middle of an even count); the
    throughputs to rows and to KPIs are each the median of the runs, every run's figures listed
    under ``repeats``; everything stored only if every run stored everything."""
    if len(runs) == 1:
        return runs[0]
    by_rows = sorted(runs, key=lambda r: r["readings_datapoints_per_s"])
    out = dict(by_rows[(len(runs) - 1) // 2])
    out["repeats"] = [{k: r.get(k) for k in REPEAT_FIGURES} for r in runs]
    out["all_stored"] = all(r["all_stored"] for r in runs)
    out["readings_rate_partial"] = any(r["readings_rate_partial"] for r in runs)
    if "kpis_datapoints_per_s" in out:
        kpis = sorted(r.get("kpis_datapoints_per_s") or 0.0 for r in runs)
        out["kpis_datapoints_per_s"] = kpis[(len(kpis) - 1) // 2] or None
        out["kpis_complete"] = all(r.get("kpis_complete") for r in runs)
    return out


def repeats_note(r: dict, key: str = "readings_datapoints_per_s") -> str:
    """ "median of 3: a / b / c" for a run that stands for several, else ""."""
    reps = r.get("repeats")
    if not reps:
        return ""
    return f"median of {len(reps)}: " + " / ".join(_n(x.get(key)) for x in reps)


# --- peers -----------------------------------------------------------------------------------


def discard_ingest_session(state: StackState) -> None:
    """Ingest's persistent MQTT session stays in its shared group after ingest stopped, and
    Mosquitto would keep queueing every message for it (extra broker work during the peers'
    runs): a clean-session connect with its client id discards it."""
    import paho.mqtt.client as mqtt  # noqa: PLC0415
    from paho.mqtt.enums import CallbackAPIVersion  # noqa: PLC0415

    from pilotlab.settings import IngestSettings  # noqa: PLC0415

    client_id = IngestSettings.model_fields["ingest_client_id"].default
    ep = MqttEndpoint.parse(state.mqtt_url)
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
    ep.configure(c)
    c.connect(ep.host, ep.port)
    c.loop_start()
    try:
        deadline = time.monotonic() + 10
        while not c.is_connected():
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not connect as {client_id} to discard its session")
            time.sleep(0.02)
    finally:
        c.disconnect()
        c.loop_stop()


def peer_names(only: list[str] | None) -> list[str]:
    from bench import peers  # noqa: PLC0415

    return [n for n in peers.PEERS if only is None or n in only]


def peer_saturation_run(b: Bench, name: str) -> dict:
    """One saturation burst of peer ``name`` in a peer process of its own: Node-RED's MQTT
    session, kept between bursts, left Mosquitto holding thousands of its messages (the
    persistence file grew by megabytes with every burst) and each burst ran slower than the one
    before (Node-RED batched 139,000 → 105,000 → 74,000 dp/s offered)."""
    from bench import peers  # noqa: PLC0415

    with peers.peer(name, b.state, b.tmp / "peers") as p:
        return saturation_run(b, f"{name}-saturation", b.cfg.peer_saturation_timeout_s, **_peer_load(p))


def _peer_load(p) -> dict:
    return {
        "with_kpis": False,
        "table": "peer_readings",
        "services_check": p.check_alive,
        "extra_roots": {"peer": p.pid},
    }


def peer_saturation_round(b: Bench, only: list[str] | None, runs: dict[str, list[dict]]) -> None:
    """One saturation burst of each peer (pilotlab's services stopped), appended to ``runs``
    under its name; a peer that cannot run gets its reason instead, and no further bursts."""
    try:
        from bench import peers  # noqa: PLC0415

        names = peer_names(only)
    except ImportError as exc:  # phase_peers reports it too
        print(f"  peers not run: bench/peers cannot be imported ({exc})", flush=True)
        return
    for name in names:
        mine = runs.setdefault(name, [])
        if mine and "error" in mine[-1]:
            continue
        try:
            mine.append(peer_saturation_run(b, name))
        except peers.PeerError as exc:
            mine.append({"error": str(exc)})
            print(f"  {name}: {exc}", flush=True)


def phase_peers(
    b: Bench,
    pilot: dict,
    only: list[str] | None = None,
    *,
    saturation: dict[str, list[dict]] | None = None,
    pilot_runs: list[dict] | None = None,
) -> dict:
    """Each peer of bench/peers on the same stack (pilotlab's services stopped): the 1,000 dp/s
    latency run and the saturation runs, measured by the same code as pilotlab's (rows of
    ``peer_readings``), and the ratios pilotlab / peer. ``saturation``: the peers' bursts
    already run, round by round between pilotlab's (``pilot_runs``, in the same order); else
    each peer's bursts run here, one after the other."""
    try:
        from bench import peers  # noqa: PLC0415
    except ImportError as exc:
        return {"status": f"not run: bench/peers cannot be imported ({exc})"}
    cfg = b.cfg
    rate = cfg.fixed_rates[0]  # the peers' latency run: pilotlab's first fixed load (1,000 dp/s)
    runs = []
    for name in peer_names(only):
        t = time.monotonic()
        entry: dict = {"peer": name}
        sat_runs = list((saturation or {}).get(name) or [])
        try:
            if sat_runs and "error" in sat_runs[-1]:
                raise peers.PeerError(sat_runs[-1]["error"])
            with peers.peer(name, b.state, b.tmp / "peers") as p:
                entry["fixed"] = run_load(
                    b, f"{name}-fixed-{rate}", rate=rate, duration=cfg.fixed_s,
                    drain_timeout=cfg.drain_timeout_s, **_peer_load(p),
                )  # fmt: skip
                print_run(entry["fixed"])
            if saturation is None:
                sat_runs = [peer_saturation_run(b, name) for _ in range(cfg.saturation_repeats)]
            if not sat_runs:
                raise peers.PeerError("no saturation run")
            entry["saturation"] = median_saturation(sat_runs)
        except peers.PeerError as exc:
            entry["error"] = str(exc)
            print(f"  {name}: {exc}", flush=True)
        entry["wall_s"] = round(time.monotonic() - t, 1)
        entry.update(peer_ratios(entry, pilot))
        if saturation is not None and "saturation" in entry:
            entry["ratio_throughput_by_round"] = round_ratios(pilot_runs or [], sat_runs)
        runs.append(entry)
    versions = peers.versions()
    return {"status": "run", "versions": versions, "interleaved": saturation is not None, "runs": runs}


def round_ratios(pilot_runs: list[dict], peer_runs: list[dict]) -> list[float | None]:
    """pilotlab / peer throughput to stored rows, burst by burst (round k: pilotlab's k-th
    burst and the peer's k-th, run minutes apart at most)."""
    return [throughput_ratio(a, c) for a, c in zip(pilot_runs, peer_runs, strict=False)]


def throughput_ratio(pilot: dict, peer: dict) -> float | None:
    """pilotlab / peer throughput to stored rows of two saturation runs (or their medians)."""
    a, c = pilot.get("readings_datapoints_per_s"), peer.get("readings_datapoints_per_s")
    return a / c if a and c else None


def peer_ratios(entry: dict, pilot: dict) -> dict:
    """pilotlab / peer throughput (saturation, to stored rows) and peer / pilotlab latency."""
    out: dict = {}
    sat, psat = pilot.get("saturation") or {}, entry.get("saturation") or {}
    out["ratio_throughput_pilotlab_to_peer"] = throughput_ratio(sat, psat)
    pf = entry.get("fixed")
    rate = pf["load"]["target_datapoints_per_s"] if pf else None
    fixed = next((r for r in pilot.get("fixed") or [] if r["load"]["target_datapoints_per_s"] == rate), None)
    for q in ("p50", "p95", "p99"):
        x = fixed["latency_s"][q] if fixed else None
        y = pf["latency_s"][q] if pf else None
        out[f"ratio_latency_{q}_peer_to_pilotlab"] = y / x if x and y else None
    return out


def saturation_figures(r: dict) -> dict:
    """Throughput of a saturation run: datapoints / (first publish → last row stored); when not
    everything was stored in time, the rows stored by then over the time waited (partial)."""
    n, first = r["published_datapoints"], r["load"]["first_publish"]
    if r["all_stored"] and r["first_publish_to_last_stored_s"]:
        r["readings_datapoints_per_s"] = n / r["first_publish_to_last_stored_s"]
        r["readings_rate_partial"] = False
    else:
        r["readings_datapoints_per_s"] = r["stored_datapoints"] / (r["drained_at"] - first)
        r["readings_rate_partial"] = True
    if "kpi" in r:
        done = r.get("first_publish_to_kpis_complete_s")
        r["kpis_datapoints_per_s"] = n / done if done else None
    return r


# --- machine info and output -----------------------------------------------------------------


def _version(argv: list[str], pattern: str = r"(\d+\.\d+(\.\d+)?)") -> str | None:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(pattern, p.stdout + p.stderr)
    return m.group(1) if m else None


def machine_info() -> dict:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    mem_kb = next(
        int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")
    )
    os_name = platform.platform()
    osr = Path("/etc/os-release")
    if osr.exists():
        m = re.search(r'PRETTY_NAME="([^"]+)"', osr.read_text())
        os_name = m.group(1) if m else os_name
    bindir = find_postgres_bindir()
    import confluent_kafka  # noqa: PLC0415
    import paho.mqtt  # noqa: PLC0415

    git = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    )
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kb / 1024 / 1024, 1),
        "os": os_name,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "mosquitto": _version([find_mosquitto() or "mosquitto", "-h"]),
        "tansu": _version([find_tansu() or "tansu", "--version"]),
        "postgres": _version([str(bindir / "postgres") if bindir else "postgres", "--version"]),
        "paho_mqtt": paho.mqtt.__version__,
        "confluent_kafka": confluent_kafka.version()[0],
        "librdkafka": confluent_kafka.libversion()[0],
        "psycopg": psycopg.__version__,
        "git_commit": git.stdout.strip() + ("+dirty" if dirty.stdout.strip() else ""),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def print_run(r: dict) -> None:
    lat, kpi = r["latency_s"], r.get("kpi", {}).get("lag_s", {})
    f = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    print(
        f"  {r['name']:<14} offered {r['offered_datapoints_per_s']:>9,.0f} dp/s; stored {r['stored_datapoints']:,}/"
        f"{r['published_datapoints']:,}; latency p50/p95/p99 {f(lat['p50'])}/{f(lat['p95'])}/{f(lat['p99'])} s; "
        f"KPI lag p50/p95 {f(kpi.get('p50'))}/{f(kpi.get('p95'))} s; wall {r['wall_s']:.0f} s",
        flush=True,
    )


def _n(v, fmt: str = ",.0f") -> str:
    return "—" if v is None else format(v, fmt)


def _ms(v) -> str:
    return "—" if v is None else f"{v * 1000:,.0f}"


def _ratio(a, b) -> str:
    return "—" if not a or not b else f"{a / b:.2f}"


def cpu_per_datapoint_table(runs: list[dict], names: list[str]) -> list[str]:
    """CPU µs per published datapoint per process, for the runs that published any."""
    rows = [r for r in runs if r["cpu"].get("us_per_datapoint")]
    if not rows:
        return []
    cols = [k for k in names if any(r["cpu"]["us_per_datapoint"].get(k) for r in rows)]
    L = [
        "## CPU per datapoint (µs of CPU per published datapoint, publish start → drained)",
        "",
        "| run | " + " | ".join(cols) + " | pipeline | machine |",
        "| --- |" + " ---: |" * (len(cols) + 2),
    ]
    pipeline = ("ingest", "streams", "sink", "peer", "mosquitto", "tansu", "objects", "postgres")
    for r in rows:
        u = r["cpu"]["us_per_datapoint"]
        total = sum(u.get(k) or 0.0 for k in pipeline)
        L.append(
            f"| {r['name']} | " + " | ".join(_n(u.get(k), ".1f") for k in cols) + f" | {total:.1f} | "
            f"{_n(u.get('machine'), '.1f')} |"
        )
    L += [
        "",
        "pipeline = the services and the brokers and database they use (not the load generator nor the harness); "
        "machine = everything on the box, other engineers' programs included.",
        "",
    ]
    return L


def disk_writes_table(runs: list[dict], names: list[str], message_bytes: int, per_message: int) -> list[str]:
    """Bytes written to storage per published datapoint per process (bench.e2e.cpu's
    ``written_bytes``), for the runs that published any and measured it."""
    rows = [r for r in runs if r.get("published_datapoints") and r["cpu"].get("written_bytes") is not None]
    if not rows:
        return []
    cols = [k for k in names if any(r["cpu"]["written_bytes"].get(k) for r in rows)]
    if not cols:
        return []
    L = [
        "## Disk writes per datapoint (bytes written to storage per published datapoint)",
        "",
        "| run | " + " | ".join(cols) + " | MB in all |",
        "| --- |" + " ---: |" * (len(cols) + 1),
    ]
    for r in rows:
        w, n = r["cpu"]["written_bytes"], r["published_datapoints"]
        L.append(
            f"| {r['name']} | "
            + " | ".join(_n(w.get(k, 0) / n, ",.0f") for k in cols)
            + f" | {sum(w.values()) / 1e6:,.0f} |"
        )
    L += [
        "",
        "From /proc/<pid>/io `write_bytes` of each process tree's live processes (page cache included; a "
        "process that exited during the run takes its share with it). A message is "
        f"{message_bytes:,} bytes, {message_bytes / per_message:.0f} per datapoint. Mosquitto writes when it "
        "saves its persistence file: after every 100 messages queued for a subscriber's session (ingest's, a "
        "peer's), the whole file each time (docs/operations.md, \"The MQTT broker's acknowledgement window\"), so "
        "a backlog in Mosquitto costs writes in proportion to its size.",
        "",
    ]
    return L


REQUEST_COLUMNS = ("Fetch", "Produce", "OffsetCommit", "Heartbeat", "Metadata", "ListOffsets", "OffsetFetch")


def kafka_requests_table(runs: list[dict]) -> list[str]:
    """Kafka requests/s to the broker by sending process and API, for the idle, fixed and
    saturation runs (bench/e2e/kafka_requests.py counts them on the loopback interface)."""
    rows = [r for r in runs if (r.get("kafka_requests") or {}).get("per_s") and not r["name"].startswith("step-")]
    if not rows:
        errors = {r["kafka_requests"].get("error") for r in runs if r.get("kafka_requests")} - {None}
        return [f"Kafka requests not counted: {e}" for e in errors] + ([""] if errors else [])
    L = [
        "## Kafka requests/s to the broker (counted on the loopback interface)",
        "",
        "| run | process | " + " | ".join(REQUEST_COLUMNS) + " | other | all |",
        "| --- | --- |" + " ---: |" * (len(REQUEST_COLUMNS) + 2),
    ]
    for r in rows:
        kr = r["kafka_requests"]
        for who, apis in [*sorted(kr["per_s"].items()), ("all", kr["total_per_s"])]:
            other = sum(v for k, v in apis.items() if k not in REQUEST_COLUMNS)
            L.append(
                f"| {r['name']} | {who} | "
                + " | ".join(_n(apis.get(k), ",.1f") for k in REQUEST_COLUMNS)
                + f" | {other:,.1f} | {sum(apis.values()):,.1f} |"
            )
        if kr.get("dropped"):
            L.append(f"| {r['name']} | (the packet socket dropped {kr['dropped']:,} packets: counts are low) | |")
    L.append("")
    return L


TARGETS = {  # the efficiency goals the report checks itself against
    "broker_cores_at_10000": 0.2,
    "p99_stored_at_10000_s": 0.5,
    "sustained_datapoints_per_s": 60_000,
    "ratio_to_nodered": 1.2,
    "ratio_to_nodered_batched": 0.75,
}


def _fixed_at(res: dict, rate: int) -> dict | None:
    return next((r for r in res.get("fixed") or [] if r["load"]["target_datapoints_per_s"] == rate), None)


def _met(ok: bool | None) -> str:
    return "—" if ok is None else ("yes" if ok else "**no**")


def targets_table(res: dict) -> list[str]:
    """The run measured against the efficiency goals: one line each, measured beside target."""
    rows: list[tuple[str, str, str, bool | None]] = []
    for label, part in (("memory", res), ("durable", res.get("durable"))):
        f = _fixed_at(part, 10_000) if part else None
        if f is None:
            continue
        c = f["cpu"]["cores_busy"]
        broker = (c.get("tansu") or 0.0) + (c.get("objects") or 0.0)
        what = "tansu" + (" + object server" if "objects" in c else "")
        rows.append(
            (
                f"broker cores at 10,000 dp/s ({label}: {what})",
                f"{broker:.2f}",
                f"≤ {TARGETS['broker_cores_at_10000']}",
                broker <= TARGETS["broker_cores_at_10000"],
            )
        )
        p99 = f["latency_s"]["p99"]
        rows.append(
            (
                f"p99 publish → stored at 10,000 dp/s ({label})",
                _ms(p99) + " ms",
                f"≤ {TARGETS['p99_stored_at_10000_s'] * 1000:.0f} ms",
                None if p99 is None else p99 <= TARGETS["p99_stored_at_10000_s"],
            )
        )
    step, sat = res.get("step"), res.get("saturation")
    for key, sat_key in (("readings", "readings_datapoints_per_s"), ("kpis", "kpis_datapoints_per_s")):
        if not step:
            break
        sustained = step[f"sustained_{key}_datapoints_per_s"]
        behind = step["first_step_behind_readings" if key == "readings" else "first_step_behind_kpis"]
        satv = (sat or {}).get(sat_key)
        # "sustained = saturation": no step below the saturation figure fell behind
        no_gap = None if satv is None else (behind is None or behind >= satv)
        target = TARGETS["sustained_datapoints_per_s"]
        rows.append(
            (
                f"sustained to `{'readings' if key == 'readings' else 'kpi_values'}` (memory)",
                _n(sustained),
                f"≥ {target:,}",
                sustained is not None and sustained >= target,
            )
        )
        rows.append(
            (
                f"no step behind below saturation ({_n(satv)} dp/s to {key})",
                "first behind: " + _n(behind),
                "none below saturation",
                no_gap,
            )
        )
    for p in (res.get("peers") or {}).get("runs") or []:
        key = {"nodered": "ratio_to_nodered", "nodered-batched": "ratio_to_nodered_batched"}.get(p["peer"])
        if key is None:
            continue
        ratio = p.get("ratio_throughput_pilotlab_to_peer")
        rows.append(
            (
                f"pilotlab / {p['peer']} saturation throughput",
                _n(ratio, ".2f"),
                f"≥ {TARGETS[key]}",
                None if ratio is None else ratio >= TARGETS[key],
            )
        )
    if not rows:
        return []
    L = ["## Against the efficiency goals", "", "| figure | measured | goal | met |", "| --- | ---: | ---: | --- |"]
    L += [f"| {a} | {b} | {c} | {_met(d)} |" for a, b, c, d in rows]
    L.append("")
    return L


def durable_runs(res: dict) -> list[dict]:
    """The durable broker's runs, named apart, for the CPU tables."""
    d = res.get("durable") or {}
    runs = ([d["idle"]] if d.get("idle") else []) + list(d.get("fixed") or [])
    runs += [d["saturation"]] if d.get("saturation") else []
    return [{**r, "name": f"durable: {r['name']}"} for r in runs]


def durable_section(res: dict) -> list[str]:
    d = res.get("durable")
    if not d:
        return []
    L = [
        "## Durable broker (tansu's s3:// engine on the local object server; the same workload)",
        "",
        "| run | stored p50 / p95 / p99 (ms) | KPI lag p50 / p99 (ms) | to `readings` dp/s | to KPIs dp/s "
        "| all stored |",
        "| --- | --- | --- | ---: | ---: | --- |",
    ]
    for r in list(d.get("fixed") or []):
        lat, kl = r["latency_s"], r["kpi"]["lag_s"]
        L.append(
            f"| fixed {r['load']['target_datapoints_per_s']:,.0f} dp/s | {_ms(lat['p50'])} / {_ms(lat['p95'])} / "
            f"{_ms(lat['p99'])} | {_ms(kl['p50'])} / {_ms(kl['p99'])} | {_n(r['stored_datapoints_per_s'])} | "
            f"{_n(r.get('kpi_datapoints_per_s'))} | {r['all_stored']} |"
        )
    s = d.get("saturation")
    if s:
        L.append(
            f"| saturation ({s['published_datapoints']:,} dp) | | | {_n(s['readings_datapoints_per_s'])} | "
            f"{_n(s.get('kpis_datapoints_per_s'))} | {s['all_stored']} |"
        )
    L += ["", "Its CPU is in the tables above (runs named `durable: …`).", ""]
    return L


def markdown(res: dict) -> str:
    m, cfg = res["machine"], res["config"]
    L = [f"# pilotlab end-to-end benchmark — {res['started_at']}", ""]
    L.append(
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, {m['os']} (kernel {m['kernel']}), "
        f"Python {m['python']}; Mosquitto {m['mosquitto']}, tansu {m['tansu']}, PostgreSQL {m['postgres']}, "
        f"paho-mqtt {m['paho_mqtt']}, librdkafka {m['librdkafka']}, psycopg {m['psycopg']}; commit "
        f"{m['git_commit']}; load average at start {m['load_average_at_start']}."
    )
    L.append(
        f"Workload: {cfg['devices']} devices, {cfg['readings']} readings × 3 metrics = {cfg['per_message']} "
        f"datapoints per MQTT message (QoS 1); KPIs: 1-min count, mean, p95, impact. "
        + (
            "Kafka storage: memory; the fixed load and saturation again on durable storage (below). "
            if cfg.get("kafka_storage") == "both"
            else f"Kafka storage: {cfg.get('kafka_storage', 'memory')}. "
        )
        + "".join(f"{k}={v} (not the default). " for k, v in (cfg.get("env") or {}).items())
        + f"{'QUICK smoke run (tiny loads). ' if cfg['quick'] else ''}Wall time {res['wall_s']:.0f} s."
    )
    L.append("")
    sat, step, ceil = res.get("saturation"), res.get("step"), res.get("ceilings")
    L += targets_table(res)
    L += ["## Throughput (datapoints/s)", "", "| figure | datapoints/s | note |", "| --- | ---: | --- |"]
    if step:
        cut = step.get("stopped_for_budget")
        cut = f"; stopped before {cut:,} dp/s to stay within the time budget" if cut else ""
        L.append(
            f"| sustained, to `readings` (step load) | {_n(step['sustained_readings_datapoints_per_s'])} | "
            f"highest step kept up; first step behind: {_n(step['first_step_behind_readings'])}{cut} |"
        )
        L.append(
            f"| sustained, to `kpi_values` (step load) | {_n(step['sustained_kpis_datapoints_per_s'])} | "
            f"first step behind: {_n(step['first_step_behind_kpis'])} |"
        )
    if sat:
        L.append(
            f"| saturation: first publish → last row in `readings` | {_n(sat['readings_datapoints_per_s'])} | "
            f"{sat['published_datapoints']:,} datapoints written to MQTT at {_n(sat['offered_datapoints_per_s'])}/s, "
            f"acknowledged by Mosquitto at {_n(sat['load']['acked_datapoints_per_s'])}/s; "
            f"all stored: {sat['all_stored']}{'; ' + repeats_note(sat) if sat.get('repeats') else ''} |"
        )
        L.append(
            f"| saturation: first publish → KPI counts complete | {_n(sat['kpis_datapoints_per_s'])} | "
            f"complete: {sat.get('kpis_complete')}"
            f"{'; ' + repeats_note(sat, 'kpis_datapoints_per_s') if sat.get('repeats') else ''} |"
        )
    L.append("")
    if res.get("fixed"):
        L += [
            "## Latency at fixed loads (ms)",
            "",
            "| offered dp/s (achieved) | stored p50 | p95 | p99 | max | KPI lag p50 | p95 | p99 "
            "| publish → ingest p50 / p95 | ingest → stored p50 / p95 | stored / published |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |",
        ]
        for r in res["fixed"]:
            lat, kl = r["latency_s"], r["kpi"]["lag_s"]
            a, c = r["latency_to_ingest_s"], r["latency_ingest_to_stored_s"]
            L.append(
                f"| {r['load']['target_datapoints_per_s']:,.0f} ({r['offered_datapoints_per_s']:,.0f}) | "
                f"{_ms(lat['p50'])} | {_ms(lat['p95'])} | {_ms(lat['p99'])} | {_ms(lat['max'])} | "
                f"{_ms(kl['p50'])} | {_ms(kl['p95'])} | {_ms(kl['p99'])} | {_ms(a['p50'])} / {_ms(a['p95'])} | "
                f"{_ms(c['p50'])} / {_ms(c['p95'])} | {r['stored_datapoints']:,} / {r['published_datapoints']:,} |"
            )
        L += [
            "",
            "Stored = `readings.stored_at - ts` of each message's last reading (the sink's statement time); "
            "KPI lag = age of the oldest published message the 1-min count KPI does not count yet (polled "
            "every 200 ms); ingest = `received_at`.",
            "",
        ]
    runs = ([res["idle"]] if res.get("idle") else []) + list(res.get("fixed") or []) + ([sat] if sat else [])
    if step:
        runs += step["steps"]
    runs += durable_runs(res)
    for p in (res.get("peers") or {}).get("runs") or []:
        runs += [r for r in (p.get("fixed"), p.get("saturation")) if r]
    if runs:
        names = ["ingest", "streams", "sink", "peer", "mosquitto", "tansu", "objects", "postgres"]
        names += ["publisher", "harness"]
        L += [
            f"## CPU (cores busy = CPU s / wall s; the machine has {m['cores']} cores)",
            "",
            "| run | " + " | ".join(names) + " | machine | not tracked |",
            "| --- |" + " ---: |" * (len(names) + 2),
        ]
        for r in runs:
            c = r["cpu"]["cores_busy"]
            L.append(
                f"| {r['name']} | "
                + " | ".join(_n(c.get(k), ".2f") for k in names)
                + f" | {r['cpu']['machine_cores_busy']:.2f} | {r['cpu']['untracked_cores_busy']:.2f} |"
            )
        L.append("")
        L += cpu_per_datapoint_table(runs, names)
        message_bytes = len(payload(10**9, 1_800_000_000_000, cfg["readings"]))  # a run's seqs and times
        L += disk_writes_table(runs, names, message_bytes, cfg["per_message"])
        L += kafka_requests_table(runs)
    if step:
        L += [
            "## Step load",
            "",
            "| target dp/s | offered | stored dp/s | KPI dp/s | latency p50 first→last quarter (ms) | "
            "KPI lag p50 first→last quarter (ms) | readings kept up | KPIs kept up |",
            "| ---: | ---: | ---: | ---: | --- | --- | --- | --- |",
        ]
        for s in step["steps"]:
            L.append(
                f"| {s['load']['target_datapoints_per_s']:,.0f} | {s['offered_datapoints_per_s']:,.0f} | "
                f"{_n(s['stored_datapoints_per_s'])} | {_n(s.get('kpi_datapoints_per_s'))} | "
                f"{_ms(s['latency_p50_first_quarter_s'])} → {_ms(s['latency_p50_last_quarter_s'])} | "
                f"{_ms(s['kpi']['lag_p50_first_quarter_s'])} → {_ms(s['kpi']['lag_p50_last_quarter_s'])} | "
                f"{s['kept_up_readings']} | {s['kept_up_kpis']} |"
            )
        L.append("")
    if ceil:
        sat_rate = sat["readings_datapoints_per_s"] if sat else None
        L += [
            "## Raw ceilings on the same box (same messages / rows)",
            "",
            "| path | per s | datapoints/s | pilotlab saturation / ceiling |",
            "| --- | ---: | ---: | ---: |",
        ]
        L.append(
            f"| Mosquitto pub → sub (QoS 1) | {_n(ceil['mqtt_pubsub_msgs_per_s'])} msgs | "
            f"{_n(ceil['mqtt_pubsub_datapoints_per_s'])} | {_ratio(sat_rate, ceil['mqtt_pubsub_datapoints_per_s'])} |"
        )
        L.append(
            f"| Kafka produce (acks=all) | {_n(ceil['kafka_produce_records_per_s'])} records | "
            f"{_n(ceil['kafka_produce_datapoints_per_s'])} | "
            f"{_ratio(sat_rate, ceil['kafka_produce_datapoints_per_s'])} |"
        )
        L.append(
            f"| Kafka consume | {_n(ceil['kafka_consume_records_per_s'])} records | "
            f"{_n(ceil['kafka_consume_datapoints_per_s'])} | "
            f"{_ratio(sat_rate, ceil['kafka_consume_datapoints_per_s'])} |"
        )
        L.append(
            f"| PostgreSQL raw COPY | {_n(ceil['postgres_raw_copy_rows_per_s'])} rows | "
            f"{_n(ceil['postgres_raw_copy_rows_per_s'])} | {_ratio(sat_rate, ceil['postgres_raw_copy_rows_per_s'])} |"
        )
        L.append(
            "| PostgreSQL, the sink's write path (storage.writer) | "
            f"{_n(ceil['postgres_sink_copy_merge_rows_per_s'])} rows "
            f"| {_n(ceil['postgres_sink_copy_merge_rows_per_s'])} | "
            f"{_ratio(sat_rate, ceil['postgres_sink_copy_merge_rows_per_s'])} |"
        )
        L.append("")
    L += durable_section(res)
    peers = res.get("peers")
    if peers:
        L += ["## Peers (same workload, same box; pilotlab's services stopped meanwhile)", ""]
        if "runs" not in peers:
            L += [f"{peers.get('status')}", ""]
        else:
            v = peers.get("versions") or {}
            L += [
                f"Node {v.get('node') or '—'}, Node-RED {v.get('node-red') or '—'}, pg {v.get('pg') or '—'}. "
                f"Latency at {cfg['fixed_rates'][0]:,} dp/s; saturation = the same {cfg['saturation_datapoints']:,} "
                "datapoints as pilotlab's, first publish → last row stored; each system's saturation is the median of "
                f"{cfg.get('saturation_repeats', 1)} runs (its CPU, in the tables above, that of the median run), and "
                "the ratios are of the medians."
                + (
                    " The bursts alternate: round k is pilotlab's k-th burst, then each peer's k-th (pilotlab's "
                    'services restarted and warmed up between rounds); "by round" is pilotlab ÷ peer within each '
                    "round."
                    if peers.get("interleaved")
                    else ""
                ),
                "",
                "| peer | saturation dp/s | runs | all stored | latency p50 / p95 / p99 (ms) | "
                "pilotlab / peer throughput | peer / pilotlab latency p50 / p99 |",
                "| --- | ---: | --- | --- | --- | ---: | --- |",
            ]
            if sat or res.get("fixed"):
                fixed = next(iter(res.get("fixed") or []), None)
                lat = fixed["latency_s"] if fixed else {}
                L.append(
                    f"| **pilotlab** (to `readings`) | {_n((sat or {}).get('readings_datapoints_per_s'))} | "
                    f"{repeats_note(sat or {})} | {(sat or {}).get('all_stored')} | "
                    f"{_ms(lat.get('p50'))} / {_ms(lat.get('p95'))} / {_ms(lat.get('p99'))} | 1.00 | 1.00 / 1.00 |"
                )
            for p in peers["runs"]:
                if "error" in p:
                    L.append(f"| {p['peer']} | not run: {p['error']} | | | | | |")
                    continue
                s, f = p.get("saturation") or {}, p.get("fixed") or {}
                lat = f.get("latency_s") or {}
                partial = " (partial: timed out)" if s.get("readings_rate_partial") else ""
                by_round = p.get("ratio_throughput_by_round")
                rounds = "by round: " + " / ".join(_n(x, ".2f") for x in by_round) if by_round else ""
                rounds = f"; {rounds}" if rounds and repeats_note(s) else rounds
                L.append(
                    f"| {p['peer']} | {_n(s.get('readings_datapoints_per_s'))}{partial} | {repeats_note(s)}{rounds} | "
                    f"{s.get('all_stored')} | "
                    f"{_ms(lat.get('p50'))} / {_ms(lat.get('p95'))} / {_ms(lat.get('p99'))} | "
                    f"{_n(p.get('ratio_throughput_pilotlab_to_peer'), '.2f')} | "
                    f"{_n(p.get('ratio_latency_p50_peer_to_pilotlab'), '.2f')} / "
                    f"{_n(p.get('ratio_latency_p99_peer_to_pilotlab'), '.2f')} |"
                )
            L.append("")
    L += ["## Phase timings (s)", "", "| phase | s |", "| --- | ---: |"]
    L += [f"| {k} | {v:.0f} |" for k, v in res["timings"].items()]
    L.append("")
    return "\n".join(L)


def save(res: dict, out_dir: Path) -> tuple[Path, Path]:
    """``e2e-<UTC>.json``/``.md``, the one copy of the run's figures, and ``latest.md``, which
    only points at them (no second copy to drift); a quick run writes ``e2e-quick-<UTC>.*`` and
    ``latest-quick.md`` (it never replaces a full run's ``latest``). Only a run of every phase
    moves the pointer: a run of some (``--phases fixed``, an A/B comparison) is kept, not latest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = res["started_at"].replace(":", "").replace("-", "")
    storage = res["config"].get("kafka_storage", "both")
    kind = ("-quick" if res["config"]["quick"] else "") + ("" if storage == "both" else f"-{storage}")
    j, md = out_dir / f"e2e{kind}-{stamp}.json", out_dir / f"e2e{kind}-{stamp}.md"
    text = json.dumps(res, indent=2, default=str)
    mdt = markdown(res)
    j.write_text(text)
    md.write_text(mdt)
    if set(res["phases"]) >= set(PHASES):
        (out_dir / f"latest{kind}.md").write_text(latest_pointer(j, md))
    return j, md


def latest_pointer(j: Path, md: Path) -> str:
    """The text of ``latest*.md``: links to the newest run's files beside it, nothing copied."""
    return (
        "# Latest end-to-end benchmark run\n\n"
        f"[{md.name}]({md.name}) (the figures as JSON: [{j.name}]({j.name})). Each run is written\n"
        "once, under its start time; this file only points at the newest.\n"
    )


# --- main ------------------------------------------------------------------------------------

DURABLE_PHASES = ("fixed", "saturation")
# what the peers' runs after the step load take, kept from it: all of them (360 s), or with
# the saturation rounds alternating (run before the step) only their fixed loads (about 125 s)
PEERS_RESERVE_S = 360.0
PEERS_FIXED_RESERVE_S = 150.0
DURABLE_RESERVE_S = 150.0  # what the durable broker's fixed load and saturation take, kept from the step load


@contextlib.contextmanager
def pipeline_window(b: Bench):
    """pilotlab's services up, warmed up (a short load stored and counted) and idle, as
    ``b.services``. On leaving, the services stop and ingest's
    persistent MQTT session is discarded (the peers' runs must not queue messages for it)."""
    with Services(b.state, b.tmp / "services").start("ingest", "streams", "sink") as services:
        b.services = services
        try:
            services.wait_ingest_ready()
            warm = pipeline_run(b, "warm-up", rate=1000, duration=3, drain_timeout=120)
            if not (warm["all_stored"] and warm["kpis_complete"]):
                raise RuntimeError(
                    f"warm-up not stored/counted: {warm['stored_datapoints']} rows, "
                    f"{warm['kpi']['counted']} counted; see {b.tmp / 'services'}"
                )
            wait_pipeline_idle(b)
            yield
        finally:
            b.services = None
    discard_ingest_session(b.state)


def run_step(b: Bench, phases: list[str], reserve_s: float, *, peers_rounds_done: bool = False) -> dict:
    """The step load, keeping time for what follows it (the peers' runs, the durable broker)."""
    peers = PEERS_FIXED_RESERVE_S if peers_rounds_done else PEERS_RESERVE_S
    reserve = reserve_s + (peers if "peers" in phases else 0)
    with b.timed("step", "step load"):
        return phase_step(b, reserve_s=0 if b.cfg.quick else reserve)


def pipeline_phases(b: Bench, res: dict, phases: list[str], only: list[str] | None, reserve_s: float) -> None:
    """The phases that run pilotlab's services or the peers, in their order, into ``res``."""
    cfg = b.cfg
    # pilotlab's saturation bursts alternate with the peers' (round k: pilotlab's k-th burst,
    # then each peer's k-th), so that each ratio compares bursts minutes apart at most, not
    # pilotlab's early in the run against the peers' ten minutes later on a shared box
    interleave = "saturation" in phases and "peers" in phases
    repeats = cfg.saturation_repeats
    pilot_sat: list[dict] = []
    peer_sat: dict[str, list[dict]] = {}
    if {"fixed", "step", "saturation"} & set(phases):
        t = time.monotonic()
        with pipeline_window(b):
            b.timings["services_up_and_warm_up"] = time.monotonic() - t
            res["idle"] = measure_idle(b, 3 if cfg.quick else 10)
            if "fixed" in phases:
                with b.timed("fixed", "fixed loads"):
                    res["fixed"] = phase_fixed(b)
            # saturation before the step load: each peer's saturation run starts from an
            # empty table, and pilotlab's then from a comparable state (a broker and a table
            # holding the fixed loads and earlier bursts only, not the step load's ten million
            # datapoints: tansu's fetches list a partition's whole history, docs/performance.md)
            if "saturation" in phases:
                with b.timed("saturation", "saturation"):
                    pilot_sat += phase_saturation(b, 1 if interleave else repeats)
            if "step" in phases and not interleave:
                res["step"] = run_step(b, phases, reserve_s)
    if interleave:
        for k in range(repeats):
            with b.timed(f"peers_saturation_{k + 1}", f"peers: saturation round {k + 1} of {repeats}"):
                peer_saturation_round(b, only, peer_sat)
            if k + 1 < repeats:
                t = time.monotonic()
                with pipeline_window(b):
                    print(f"saturation round {k + 2} of {repeats}", flush=True)
                    pilot_sat += phase_saturation(b, 1)
                b.timings["saturation"] += time.monotonic() - t
        if "step" in phases:  # after the last round: its ten million datapoints weigh on no burst
            t = time.monotonic()
            with pipeline_window(b):
                b.timings["services_up_and_warm_up"] += time.monotonic() - t
                res["step"] = run_step(b, phases, reserve_s, peers_rounds_done=True)
    if pilot_sat:
        res["saturation"] = median_saturation(pilot_sat)
    if "peers" in phases:
        with b.timed("peers", "peers"):
            res["peers"] = phase_peers(b, res, only, saturation=peer_sat if interleave else None, pilot_runs=pilot_sat)


def run_on_stack(
    cfg: Config,
    kafka_storage: str,
    phases: list[str],
    tmp: Path,
    *,
    t0: float,
    peers_only: str | None = None,
    reserve_s: float = 0.0,
) -> dict:
    """The asked phases on one fresh embedded stack with the given Kafka storage; returns the
    phases' figures and their timings."""
    res: dict = {}
    tmp.mkdir(parents=True, exist_ok=True)
    tmp.chmod(0o755)
    stack = Stack(tmp / "stack", kafka_storage=kafka_storage)
    b = None
    try:
        t = time.monotonic()
        state = stack.up()
        migrate(state.database_url)
        ensure_topics(state.kafka_bootstrap, partitions=4)
        exp = experiment(cfg.devices)
        registry.publish(state.kafka_bootstrap, [exp])
        b = Bench(cfg, state, tmp, t0=t0)
        b.timings["stack_up"] = time.monotonic() - t
        if "ceilings" in phases:
            with b.timed("ceilings", "ceilings: raw Mosquitto, raw Kafka, PostgreSQL COPY"):
                res["ceilings"] = phase_ceilings(b)
        only = [x.strip() for x in peers_only.split(",")] if peers_only else None
        pipeline_phases(b, res, phases, only, reserve_s)
    finally:
        t = time.monotonic()
        stack.down(purge=True)
        if b is not None:
            b.timings["stack_down"] = time.monotonic() - t
    res["timings"] = {k: round(v, 1) for k, v in b.timings.items()} if b is not None else {}
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a 2-3 minute smoke run of tiny loads")
    ap.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--fixed-rates", help="datapoints/s, comma-separated")
    ap.add_argument("--steps", help="datapoints/s, comma-separated")
    ap.add_argument("--saturation-datapoints", type=int)
    ap.add_argument("--saturation-repeats", type=int, help="saturation bursts per system (the median reported)")
    ap.add_argument("--peers", help="comma-separated subset of bench/peers' PEERS (default: all)")
    ap.add_argument(
        "--kafka-storage",
        choices=(*KAFKA_STORAGE, "both"),
        default="both",
        help="the embedded Kafka broker's storage: both (every phase on memory storage, then the fixed load and "
        "saturation again on durable storage; the default), memory, or durable (files, the default of "
        "`pilotlab stack up`)",
    )
    a = ap.parse_args(argv)
    phases = [p.strip() for p in a.phases.split(",") if p.strip()]
    unknown = set(phases) - set(PHASES)
    if unknown:
        ap.error(f"unknown phases {sorted(unknown)}; choose from {', '.join(PHASES)}")
    cfg = quick_config() if a.quick else Config()
    if a.fixed_rates:
        cfg.fixed_rates = tuple(int(x) for x in a.fixed_rates.split(","))
    if a.steps:
        cfg.steps = tuple(int(x) for x in a.steps.split(","))
    if a.saturation_datapoints:
        cfg.saturation_datapoints = a.saturation_datapoints
    if a.saturation_repeats is not None:
        if a.saturation_repeats < 1:
            ap.error("--saturation-repeats must be at least 1")
        cfg.saturation_repeats = a.saturation_repeats

    started = datetime.now(UTC).replace(microsecond=0)
    res: dict = {
        "started_at": started.isoformat().replace("+00:00", "Z"),
        "machine": machine_info(),
        "config": {
            **asdict(cfg),
            "per_message": cfg.per_message,
            "kafka_storage": a.kafka_storage,
            # settings the services take from the environment instead of their defaults (an A/B run)
            "env": {
                k: v
                for k, v in sorted(os.environ.items())
                if k.startswith("PILOTLAB_") and not any(w in k for w in ("URL", "PASSWORD", "SECRET", "TOKEN"))
            },
        },
        "phases": phases,
    }
    print(f"pilotlab end-to-end benchmark ({'quick' if cfg.quick else 'full'}): phases {', '.join(phases)}", flush=True)
    t_all = time.monotonic()
    main_storage = "memory" if a.kafka_storage == "both" else a.kafka_storage
    durable_phases = [p for p in phases if p in DURABLE_PHASES] if a.kafka_storage == "both" else []
    with tempfile.TemporaryDirectory(prefix="pilotlab-bench-e2e-") as tmpdir:
        tmp = Path(tmpdir)
        # reachable by the unprivileged user PostgreSQL runs as when we are root: its data then
        # stays inside this directory and goes with it (else the stack puts it in /tmp for good)
        tmp.chmod(0o755)
        reserve = DURABLE_RESERVE_S if durable_phases else 0.0
        res.update(
            run_on_stack(cfg, main_storage, phases, tmp / main_storage, t0=t_all, peers_only=a.peers, reserve_s=reserve)
        )
        if durable_phases:
            # the same workload on the durable broker (files through the object server, the
            # default of `pilotlab stack up`): its latency at the fixed load and its saturation
            dcfg = replace(cfg, fixed_rates=cfg.fixed_rates[-1:], saturation_repeats=1)  # reported, not judged
            print("durable broker: the same fixed load and saturation", flush=True)
            t = time.monotonic()
            res["durable"] = run_on_stack(dcfg, "durable", durable_phases, tmp / "durable", t0=time.monotonic())
            res["timings"]["durable_broker"] = round(time.monotonic() - t, 1)
    res["wall_s"] = round(time.monotonic() - t_all, 1)
    res["timings"]["total"] = res["wall_s"]
    j, md = save(res, a.out_dir)
    print()
    print(markdown(res))
    pointer = " (and the latest*.md pointer beside them)" if set(phases) >= set(PHASES) else ""
    print(f"written: {j} and {md}{pointer}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
