"""Benchmark of the streams worker, measured side by side in one run on one embedded stack.

1. N reading batches (4 readings each, an experiment with every KPI kind) are produced to
   ``pilotlab.readings``.
2. The same N messages are then consumed, each from the start of the topic by its own group:
   * a bare confluent-kafka consumer loop (the ceiling of the machine and broker);
   * a no-op Faust agent iterating ``stream.events()`` (Faust's own overhead);
   * a no-op Faust agent iterating ``stream.take(500, within=0.1)`` (Faust's batching);
   * the real streams worker (``pilotlab run streams``), timed from its first KPI record on
     ``pilotlab.kpis`` to the record whose 15-minute counts add up to every reading (Kafka
     CreateTime stamps; the worker sends the latest KPIs of each chunk of messages).
3. Reading-to-KPI latency: with the worker caught up, probe batches are produced one at a
   time (every 20 ms), each in its own minute of event time; the latency of each is the
   CreateTime of the first KPI record carrying its minute's mean minus the CreateTime of the
   reading record.

Prints events/s for each consumer, the ratios, and latency p50/p95/max. Run:
``python bench/bench_streams.py [--messages 10000]`` (or ``make bench-streams``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from control.stack import Stack  # noqa: E402
from pilotlab import registry  # noqa: E402
from pilotlab.contracts import KafkaTopics, KpiValue, Reading, ReadingBatch, decode_kpis, to_ms, utcnow  # noqa: E402
from pilotlab.kafka_admin import ensure_topics  # noqa: E402
from pilotlab.manifest import Experiment  # noqa: E402

EXP_ID = "bench-streams"
KPIS = [
    {"name": "no2_mean", "metric": "no2", "kind": "mean", "window": "1m"},
    {"name": "no2_max", "metric": "no2", "kind": "max", "window": "1m"},
    {"name": "no2_count", "metric": "no2", "kind": "count", "window": "15m"},
    {"name": "no2_p95", "metric": "no2", "kind": "quantile", "q": 0.95, "window": "1h"},
    {"name": "pm25_over", "metric": "pm25", "kind": "exceedance", "threshold": 25, "window": "1h"},
    {"name": "no2_avail", "metric": "no2", "kind": "availability", "window": "1h"},
    {"name": "no2_complete", "metric": "no2", "kind": "completeness", "window": "1h"},
    {"name": "no2_fresh", "metric": "no2", "kind": "freshness", "window": "1h"},
    {"name": "no2_impact", "metric": "no2", "kind": "impact"},
]


def experiment() -> Experiment:
    end = utcnow().replace(minute=0, second=0, microsecond=0)
    start, mid = end - timedelta(days=14), end - timedelta(days=7)
    return Experiment.model_validate(
        {
            "id": EXP_ID,
            "title": "bench",
            "startup": "bench",
            "district": "bench",
            "location": {"lat": 45.0, "lon": 7.6},
            "periods": {
                "baseline": {"start": start.isoformat(), "end": mid.isoformat()},
                "intervention": {"start": mid.isoformat(), "end": end.isoformat()},
            },
            "devices": [
                {"id": f"bench-{g[0]}{i:02d}", "kind": "air_quality", "group": g, "interval": "1m"}
                for g in ("treatment", "control")
                for i in range(10)
            ],
            "kpis": KPIS,
        }
    )


def batches(exp: Experiment, n: int, first_seq: int = 0, probe: bool = False) -> list[bytes]:
    """``n`` batches of 4 readings a minute apart, cycling over the devices; probes each get
    their own 4 minutes of event time, after all bulk data."""
    t0 = to_ms(exp.periods.baseline.start)
    out = []
    devices = exp.devices
    for i in range(first_seq, first_seq + n):
        d = devices[i % len(devices)]
        base = t0 + (first_seq // len(devices) + 1 + i - first_seq if probe else i // len(devices)) * 4 * 60_000
        readings = tuple(
            Reading(4 * i + j, base + j * 60_000, {"no2": 20.0 + (i * 7 + j) % 30, "pm25": 10.0 + (i + j) % 25})
            for j in range(4)
        )
        out.append(ReadingBatch(exp.id, d.id, d.group, base + 4 * 60_000, readings).to_json())
    return out


def first_minute(payload: bytes) -> int:
    return ReadingBatch.from_json(payload).readings[0].ts_ms


def produce(bootstrap: str, payloads: list[bytes], pace_s: float = 0.0) -> list[int]:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5 if not pace_s else 0, "acks": "all"})
    stamps: list[int] = []
    for p in payloads:
        producer.produce(KafkaTopics.READINGS, key=EXP_ID.encode(), value=p)
        if pace_s:
            producer.flush(10)
            time.sleep(pace_s)
        else:
            producer.poll(0)
    producer.flush(60)
    return stamps


def bare_consumer(bootstrap: str, n: int) -> float:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-bare-{uuid.uuid4().hex[:8]}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})  # fmt: skip
    consumer.subscribe([KafkaTopics.READINGS])
    got, first = 0, None
    try:
        while got < n:
            for msg in consumer.consume(1000, 1.0):
                if msg.error():
                    continue
                if first is None:
                    first = time.perf_counter()
                ReadingBatch.from_json(msg.value())  # decode, like every consumer below
                got += 1
        return n / (time.perf_counter() - first)
    finally:
        consumer.close()


def noop_worker(bootstrap: str, n: int, mode: str, out: str) -> None:
    """Runs in a child process: a Faust app whose agent only decodes and counts."""
    import faust  # noqa: PLC0415
    from faust.worker import Worker  # noqa: PLC0415

    app = faust.App(f"bench-noop-{mode}-{uuid.uuid4().hex[:8]}", broker=f"kafka://{bootstrap}",
                    store="memory://", web_enabled=False, consumer_auto_offset_reset="earliest",
                    broker_session_timeout=6, datadir=tempfile.mkdtemp())  # fmt: skip
    topic = app.topic(KafkaTopics.READINGS, key_type=bytes, value_type=bytes, key_serializer="raw",
                      value_serializer="raw")  # fmt: skip
    state = {"got": 0, "first": None, "batches": 0}

    def done() -> None:
        rate = n / (time.perf_counter() - state["first"])
        state["done"] = True
        Path(out).write_text(f"{rate} {state['batches']}")  # the parent then stops this process

    @app.agent(topic)
    async def noop(stream):
        if mode == "take":
            async for values in stream.take(500, within=0.1):
                state["first"] = state["first"] or time.perf_counter()
                state["batches"] += 1
                for v in values:
                    ReadingBatch.from_json(v)
                state["got"] += len(values)
                if state["got"] >= n and not state.get("done"):
                    done()
        else:
            async for event in stream.events():
                state["first"] = state["first"] or time.perf_counter()
                ReadingBatch.from_json(event.value)
                state["got"] += 1
                if state["got"] >= n and not state.get("done"):
                    done()

    Worker(app, loglevel="WARNING", quiet=True).execute_from_commandline()


def run_noop(bootstrap: str, n: int, mode: str) -> tuple[float, int]:
    with tempfile.NamedTemporaryFile(suffix=".txt", delete=False) as f:
        out = f.name
    proc = subprocess.Popen([sys.executable, __file__, "--noop", mode, "--bootstrap", bootstrap,
                             "--messages", str(n), "--out", out], stdin=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not Path(out).read_text():
            time.sleep(0.2)
    finally:
        proc.kill()  # a no-op worker has nothing to save
        proc.wait(30)
    rate, batches_ = Path(out).read_text().split()
    return float(rate), int(batches_)


def kpi_records(bootstrap: str, until, timeout: float) -> list[tuple[int, list[KpiValue]]]:
    """(CreateTime ms, KPI values) of the bench experiment's records on pilotlab.kpis, read
    from the start until ``until(records)`` is true."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-unused", "enable.auto.commit": False})
    parts = consumer.list_topics(KafkaTopics.KPIS, timeout=10).topics[KafkaTopics.KPIS].partitions
    consumer.assign([TopicPartition(KafkaTopics.KPIS, p, OFFSET_BEGINNING) for p in parts])
    records: list[tuple[int, list[KpiValue]]] = []
    deadline = time.monotonic() + timeout
    try:
        while not until(records) and time.monotonic() < deadline:
            for msg in consumer.consume(1000, 0.5):
                if not msg.error() and msg.key() == EXP_ID.encode():
                    records.append((msg.timestamp()[1], decode_kpis(msg.value())))
        return records
    finally:
        consumer.close()


def counted(records: list[tuple[int, list[KpiValue]]]) -> int:
    """Readings counted so far: the latest ``no2_count`` of each 15-minute window, summed."""
    latest: dict[tuple, int] = {}
    for _, values in records:
        for v in values:
            if v.kpi == "no2_count":
                latest[v.key()] = v.sample_count
    return sum(latest.values())


def reading_stamps(bootstrap: str, skip: int, want: int) -> list[int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-unused", "enable.auto.commit": False})
    parts = consumer.list_topics(KafkaTopics.READINGS, timeout=10).topics[KafkaTopics.READINGS].partitions
    consumer.assign([TopicPartition(KafkaTopics.READINGS, p, OFFSET_BEGINNING) for p in parts])
    stamps: list[int] = []
    try:
        while len(stamps) < skip + want:
            for msg in consumer.consume(1000, 0.5):
                if not msg.error():
                    stamps.append(msg.timestamp()[1])
        return stamps[skip:]
    finally:
        consumer.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=10_000)
    ap.add_argument("--probes", type=int, default=200)
    ap.add_argument("--noop")
    ap.add_argument("--bootstrap")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.noop:
        noop_worker(args.bootstrap, args.messages, args.noop, args.out)
        return
    n = args.messages
    data = Path(tempfile.mkdtemp(prefix="pilotlab-bench-streams-"))
    stack = Stack(data)
    state = stack.up()
    worker = None
    try:
        ensure_topics(state.kafka_bootstrap, partitions=4)
        exp = experiment()
        registry.publish(state.kafka_bootstrap, [exp])
        t = time.perf_counter()
        produce(state.kafka_bootstrap, batches(exp, n))
        print(f"produced {n} reading batches ({4 * n} readings) in {time.perf_counter() - t:.1f} s")

        bare = bare_consumer(state.kafka_bootstrap, n)
        noop_events, _ = run_noop(state.kafka_bootstrap, n, "events")
        noop_take, take_batches = run_noop(state.kafka_bootstrap, n, "take")

        env = {**os.environ, **state.env(), "PILOTLAB_STREAMS_DATA_DIR": str(data / "streams"),
               "PILOTLAB_STREAMS_APP_ID": f"bench-streams-{uuid.uuid4().hex[:8]}"}  # fmt: skip
        log = open(data / "streams.log", "ab")  # noqa: SIM115
        worker = subprocess.Popen([sys.executable, "-m", "control", "run", "streams"], env=env,
                                  stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip
        log.close()
        records = kpi_records(state.kafka_bootstrap, lambda r: counted(r) >= 4 * n, timeout=900)
        if counted(records) < 4 * n:
            raise SystemExit(f"the worker counted {counted(records)} of {4 * n} readings; see {data / 'streams.log'}")
        real = n / ((records[-1][0] - records[0][0]) / 1000)

        probes = args.probes
        probe_batches = batches(exp, probes, first_seq=n, probe=True)
        produce(state.kafka_bootstrap, probe_batches, pace_s=0.02)
        minutes = [first_minute(b) for b in probe_batches]

        def has_probes(recs) -> bool:
            seen = {v.window_start_ms for _, vs in recs for v in vs if v.kpi == "no2_mean"}
            return all(m in seen for m in minutes)

        records = kpi_records(state.kafka_bootstrap, has_probes, timeout=120)
        first_seen: dict[int, int] = {}
        for stamp, values in records:
            for v in values:
                if v.kpi == "no2_mean":
                    first_seen.setdefault(v.window_start_ms, stamp)
        sent = reading_stamps(state.kafka_bootstrap, n, probes)
        lat = sorted(first_seen[m] - r for m, r in zip(minutes, sent, strict=True))

        print(f"\nKPI kinds per reading: {len(KPIS)}; partitions: 4; one experiment (one partition)")
        print(f"{'consumer':<42}{'events/s':>12}{'vs bare':>10}")
        for name, rate in (
            ("bare confluent-kafka loop (decode only)", bare),
            ("Faust no-op agent, stream.events()", noop_events),
            (f"Faust no-op agent, stream.take(500) [{take_batches} batches]", noop_take),
            ("streams worker (KPIs, state, changelog)", real),
        ):
            print(f"{name:<42}{rate:>12,.0f}{rate / bare:>10.3f}")
        print(f"streams worker / Faust no-op (events): {real / noop_events:.3f}")
        print(
            f"reading → KPI latency over {probes} probes (20 ms apart): p50 {statistics.median(lat):.0f} ms, "
            f"p95 {lat[int(0.95 * (len(lat) - 1))]:.0f} ms, max {lat[-1]:.0f} ms"
        )
    finally:
        if worker is not None:
            worker.terminate()
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        stack.down(purge=True)


if __name__ == "__main__":
    main()
