"""Ingest alone, MQTT → Kafka: messages/s and datapoints/s for single and batched payloads,
with the raw rates of the same broker pair measured in the same run, printed as ratios.

    python3 bench/bench_ingest.py [--messages 5000] [--batch 10] [--json]

What each figure is (all QoS 1 / acks=all, the settings ingest uses):
- raw MQTT: one client publishes N messages, a second client subscribed with QoS 1 receives
  them; rate = N / (first publish → last message received);
- raw Kafka: one producer (acks=all, linger 5 ms) produces N records of the same size as
  ingest's; rate = N / (first produce → flush returns);
- ingest: the lab's account publishes N messages to devices' telemetry topics while one
  ingest process runs; rate = N / (first publish → ingest has acknowledged the last one,
  i.e. Kafka confirmed every record), read from ingest's Prometheus counters;
- a datapoint is one metric value of one reading.

It starts its own embedded stack in a temporary directory and stops it at the end.

CPU per datapoint on the end-to-end workload:

    python3 bench/bench_ingest.py --cpu [--rate 40000 --duration 20 --runs 3] [--py-spy]
    python3 bench/bench_ingest.py --pure [--messages 6000] [--profile]

- ``--cpu``: bench/e2e/load.py's workload (experiment ``bench-e2e``, 200 devices, QoS 1
  messages of 10 readings × 3 metrics = 30 datapoints) published at ``--rate`` datapoints/s
  through one ingest process on the embedded Mosquitto and tansu (only ingest runs); per run,
  ingest's CPU (its process tree, /proc utime + stime, from the first publish until ingest
  has acknowledged the last message) and the load generator's CPU (its whole life), each
  per published datapoint; the best of ``--runs``. ``--py-spy`` samples ingest and the
  publisher during the last run and prints where their busy time goes (py-spy must be on PATH or in the venv);
- ``--pure``: the same messages through ingest's pure path in this process (bytes → decode
  and validate → authorise → seq and value screens → remember → the Kafka value), CPU by
  ``time.process_time``, best of 3; ``--profile`` adds a cProfile listing.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import json
import os
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
from confluent_kafka import Producer
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.e2e.cpu import tree_cpu
from bench.e2e.load import device_ids
from bench.e2e.load import payload as load_payload
from control.services import Services
from control.stack import Stack
from ingest.dedup import SeqMemory, ValueMemory
from ingest.pipeline import handle, remember, screen_conflicts, screen_duplicates
from pilotlab import registry
from pilotlab.contracts import Limits, telemetry_topic, to_ms, utcnow
from pilotlab.credentials import MqttEndpoint
from pilotlab.kafka_admin import ensure_topics
from pilotlab.manifest import Experiment
from pilotlab.registry import Registry

DEVICES = 20
METRICS_PER_READING = 2


def experiment() -> Experiment:
    now = utcnow().replace(microsecond=0)
    return Experiment.model_validate(
        {
            "id": "bench-ingest",
            "title": "ingest benchmark",
            "startup": "bench",
            "district": "bench",
            "location": {"lat": 45.07, "lon": 7.68},
            "periods": {
                "baseline": {"start": (now.replace(year=now.year - 1)).isoformat(), "end": now.isoformat()},
                "intervention": {"start": now.isoformat(), "end": now.replace(year=now.year + 1).isoformat()},
            },
            "devices": [
                {"id": f"bench-{i:03d}", "kind": "air_quality", "interval": "1m"} for i in range(DEVICES)
            ],
            "kpis": [{"name": "no2_mean", "metric": "no2", "kind": "mean", "window": "1m"}],
        }
    )


def payloads(exp: Experiment, n: int, batch: int, run: int) -> list[tuple[str, bytes]]:
    now = to_ms(utcnow())
    out = []
    for i in range(n):
        dev = exp.devices[i % DEVICES].id
        items = [
            {"seq": run * 10**9 + i * batch + j, "ts": now - 60_000 + j, "metrics": {"no2": 30.5, "pm25": 9.25}}
            for j in range(batch)
        ]
        out.append((telemetry_topic(exp.id, dev), orjson.dumps(items[0] if batch == 1 else items)))
    return out


def client(ep: MqttEndpoint, name: str) -> mqtt.Client:
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"{name}-{uuid.uuid4().hex[:8]}")
    ep.configure(c)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    return c


def raw_mqtt(ep: MqttEndpoint, messages: list[tuple[str, bytes]]) -> float:
    got = threading.Event()
    received = [0]
    subscribed = threading.Event()
    topic = f"pilots/bench/raw-{uuid.uuid4().hex[:8]}/raw"  # the lab account may use pilots/#

    def on_message(_c, _u, _m) -> None:
        received[0] += 1
        if received[0] == len(messages):
            got.set()

    sub = client(ep, "bench-sub")
    sub.on_message = on_message
    sub.on_subscribe = lambda *_a: subscribed.set()
    sub.on_connect = lambda c, *_a: c.subscribe(topic, qos=1)
    sub.connect(ep.host, ep.port)
    sub.loop_start()
    pub = client(ep, "bench-pub")
    pub.connect(ep.host, ep.port)
    pub.loop_start()
    try:
        if not subscribed.wait(30):
            raise TimeoutError("raw subscriber not subscribed")
        start = time.perf_counter()
        for _t, payload in messages:
            pub.publish(topic, payload, qos=1)
        if not got.wait(120):
            raise TimeoutError(f"raw MQTT: {received[0]}/{len(messages)} received")
        return len(messages) / (time.perf_counter() - start)
    finally:
        for c in (pub, sub):
            c.disconnect()
            c.loop_stop()


def raw_kafka(bootstrap: str, records: list[bytes]) -> float:
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5})
    errors: list = []
    start = time.perf_counter()
    for value in records:
        while True:
            try:
                producer.produce(
                    "pilotlab.bench-raw",
                    value=value,
                    key=b"bench-ingest",
                    on_delivery=lambda e, _m: errors.append(e) if e else None,
                )
                break
            except BufferError:
                producer.poll(0.01)
        producer.poll(0)
    left = producer.flush(300)
    elapsed = time.perf_counter() - start
    if left or errors:
        raise RuntimeError(f"raw Kafka: {left} unconfirmed, errors {errors[:3]}")
    return len(records) / elapsed


def acked(port: int) -> float:
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return 0.0
    for line in body.splitlines():
        if line.startswith("pilotlab_ingest_acked_messages_total "):
            return float(line.split()[1])
    return 0.0


def through_ingest(ep: MqttEndpoint, services: Services, messages: list[tuple[str, bytes]]) -> float:
    before = acked(services.metrics_port)
    pub = client(ep, "bench-ingest-pub")
    pub.connect(ep.host, ep.port)
    pub.loop_start()
    try:
        start = time.perf_counter()
        for topic, payload in messages:
            pub.publish(topic, payload, qos=1)
        deadline = time.monotonic() + 600
        while acked(services.metrics_port) - before < len(messages):
            services.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError("ingest did not acknowledge every message within 600 s")
            time.sleep(0.02)
        return len(messages) / (time.perf_counter() - start)
    finally:
        pub.disconnect()
        pub.loop_stop()


# --- CPU per datapoint on the end-to-end workload -------------------------------------------

LOAD = Path(__file__).resolve().parent / "e2e" / "load.py"
E2E_READINGS = 10
E2E_PER_MESSAGE = E2E_READINGS * 3


def e2e_experiment() -> Experiment:
    from bench.bench_e2e import experiment as e2e  # noqa: PLC0415 - bench_e2e is a large module

    return e2e(200)


def pure_path(messages: int, profile: bool) -> dict:
    """Ingest's pure path on load.py's messages: µs of CPU per datapoint, best of 3. It calls
    what ``IngestService._on_message`` calls, in the same order, minus MQTT and Kafka I/O."""
    exp = e2e_experiment()
    reg, limits = Registry.of([exp]), Limits()
    topics = [telemetry_topic(exp.id, d) for d in device_ids(200)]
    now = to_ms(utcnow())
    msgs = [
        (topics[i % 200], load_payload(i * E2E_READINGS, now - 60_000 + i * E2E_READINGS, E2E_READINGS))
        for i in range(messages)
    ]

    def once() -> float:
        seqs, values = SeqMemory(1024, 100_000), ValueMemory(256, 100_000)
        t0 = time.process_time()
        for topic, raw in msgs:
            out = handle(topic, raw, now, reg, limits)
            screen_duplicates(out, seqs, topic, raw)
            screen_conflicts(out, values, topic, raw)
            remember(out, seqs, object(), values)
            if out.batch is None or out.rejections:
                raise RuntimeError(f"the workload's message was refused: {out.rejections[:1]}")
            out.batch.to_json()
        return (time.process_time() - t0) / (messages * E2E_PER_MESSAGE) * 1e6

    best = min(once() for _ in range(3))
    if profile:
        prof = cProfile.Profile()
        prof.runcall(once)
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    return {"messages": messages, "pure_us_per_datapoint": best}


def _py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def py_spy_summary(raw: Path, top: int = 15) -> list[str]:
    """py-spy's collapsed stacks → the share of samples per function, inclusive and self.
    Samples whose innermost Python frame is a wait (select, poll, sleep, lock) are left out;
    without --native a wait in C (paho's select, time.sleep) counts as its caller's self time."""
    idle = ("select (", "poll (", "wait (", "sleep (", "_wait_for_tstate_lock", "acquire (")
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    lines: collections.Counter[str] = collections.Counter()  # self samples per line of ingest/
    busy = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        leaf_ingest = next((f for f in reversed(stack.split(";")) if "(ingest/" in f), None)
        # by function, not by line; without py-spy's "process N:<command line>" frames (the
        # publisher's carries the MQTT URL with its password)
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";") if not f.startswith("process ")]
        if not frames or any(frames[-1].startswith(i) for i in idle):
            continue
        n = int(count)
        busy += n
        own[frames[-1]] += n
        if leaf_ingest is not None:
            lines[leaf_ingest] += n
        for f in set(frames):
            inclusive[f] += n
    out = [f"  busy samples: {busy}"]
    out += [f"  incl {100 * n / busy:5.1f}%  {f}" for f, n in inclusive.most_common(top)] if busy else []
    out += [f"  self {100 * n / busy:5.1f}%  {f}" for f, n in own.most_common(top)] if busy else []
    out += [f"  line {100 * n / busy:5.1f}%  {f}" for f, n in lines.most_common(top)] if busy and lines else []
    return out


def workload_run(
    state, services: Services, *, rate: float, duration: float, seq_base: int, tmp: Path, spy: Path | None = None
) -> dict:
    """One load.py run through ingest: µs CPU per datapoint of ingest and of the publisher."""
    ingest_pid = services.procs["ingest"].pid
    before = acked(services.metrics_port)
    out = tmp / f"load-{seq_base}.json"
    argv = [sys.executable, str(LOAD), "--mqtt-url", state.mqtt_url, "--rate", str(rate),
            "--duration", str(duration), "--seq-base", str(seq_base), "--out", str(out)]  # fmt: skip
    cpu0 = tree_cpu({"ingest": ingest_pid})["ingest"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    spies = []
    if spy is not None:  # ingest and the publisher, each into its own file
        exe = _py_spy()
        if exe is None:
            raise RuntimeError("--py-spy: py-spy is not installed (pip install py-spy)")
        for pid, path in ((ingest_pid, spy), (proc.pid, spy.with_suffix(".publisher"))):
            spies.append(
                subprocess.Popen(
                    [exe, "record", "--subprocesses", "--nonblocking", "-r", "100", "-d", str(int(duration)),
                     "-f", "raw", "-o", str(path), "--pid", str(pid)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
            )  # fmt: skip
    try:
        if proc.wait(timeout=duration + 300) != 0:
            raise RuntimeError(f"load.py exited with {proc.returncode}")
        load = json.loads(out.read_text())
        deadline = time.monotonic() + 300
        while acked(services.metrics_port) - before < load["messages"]:
            services.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError("ingest did not acknowledge every message within 300 s")
            time.sleep(0.02)
        cpu = tree_cpu({"ingest": ingest_pid})["ingest"] - cpu0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in spies:
            p.wait(timeout=duration + 60)
    dp = load["datapoints"]
    return {
        "datapoints": dp,
        "achieved_datapoints_per_s": load["achieved_datapoints_per_s"],
        "kept_up": load["kept_up"],
        "ingest_cpu_s": cpu,
        "ingest_us_per_datapoint": cpu / dp * 1e6,
        "publisher_cpu_s": load["cpu_s"],
        "publisher_us_per_datapoint": load["cpu_s"] / dp * 1e6,
    }


def workload_cpu(rate: float, duration: float, runs: int, py_spy: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="pilotlab-bench-") as tmp:
        stack = Stack(Path(tmp) / "stack")
        try:
            state = stack.up()
            ensure_topics(state.kafka_bootstrap, partitions=4)
            registry.publish(state.kafka_bootstrap, [e2e_experiment()])
            with Services(state, Path(tmp) / "services").start("ingest") as services:
                services.wait_ingest_ready()
                workload_run(state, services, rate=3000, duration=3, seq_base=0, tmp=Path(tmp))  # warm-up
                results = []
                for i in range(runs):
                    spy = Path(tmp) / "ingest.pyspy" if py_spy and i == runs - 1 else None
                    results.append(
                        workload_run(
                            state, services, rate=rate, duration=duration, seq_base=(i + 1) * 10**9,
                            tmp=Path(tmp), spy=spy,
                        )
                    )
                    r = results[-1]
                    print(f"  run {i + 1}: ingest {r['ingest_us_per_datapoint']:.2f} µs/dp, "
                          f"publisher {r['publisher_us_per_datapoint']:.2f} µs/dp, "
                          f"achieved {r['achieved_datapoints_per_s']:,.0f} dp/s", file=sys.stderr)  # fmt: skip
                spy_lines = []
                for what, path in (("ingest", spy), ("publisher", spy and spy.with_suffix(".publisher"))):
                    if path is not None and path.exists():
                        spy_lines += [f"py-spy, {what}:", *py_spy_summary(path)]
        finally:
            stack.down(purge=True)
    return {
        "rate": rate,
        "duration_s": duration,
        "runs": results,
        "best_ingest_us_per_datapoint": min(r["ingest_us_per_datapoint"] for r in results),
        "best_publisher_us_per_datapoint": min(r["publisher_us_per_datapoint"] for r in results),
        "load_average": os.getloadavg(),
        "py_spy": spy_lines,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=5000, help="messages per single-payload run")
    ap.add_argument("--batch", type=int, default=10, help="readings per batched message")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--cpu", action="store_true", help="µs CPU per datapoint on the e2e workload (see above)")
    ap.add_argument("--rate", type=float, default=40_000, help="--cpu: datapoints/s")
    ap.add_argument("--duration", type=float, default=20, help="--cpu: seconds per run")
    ap.add_argument("--runs", type=int, default=3, help="--cpu: runs (the best is reported)")
    ap.add_argument("--py-spy", action="store_true", help="--cpu: sample ingest and the publisher during the last run")
    ap.add_argument("--pure", action="store_true", help="the pure path's µs CPU per datapoint")
    ap.add_argument("--profile", action="store_true", help="--pure: a cProfile listing too")
    args = ap.parse_args()
    if args.pure:
        res = pure_path(args.messages, args.profile)
        print(json.dumps(res, indent=2) if args.json else f"pure path: {res['pure_us_per_datapoint']:.3f} µs CPU/dp")
        return 0
    if args.cpu:
        res = workload_cpu(args.rate, args.duration, args.runs, args.py_spy)
        if args.json:
            print(json.dumps(res, indent=2))
            return 0
        print(f"e2e workload at {args.rate:,.0f} dp/s, {args.duration:g} s, best of {args.runs} "
              f"(load average {res['load_average'][0]:.2f}):")  # fmt: skip
        print(f"  ingest     {res['best_ingest_us_per_datapoint']:.2f} µs CPU per datapoint")
        pub = res["best_publisher_us_per_datapoint"]
        print(f"  publisher  {pub:.2f} µs CPU per datapoint (load.py, its whole life)")
        print("\n".join(res["py_spy"]))
        return 0
    n_single, n_batched = args.messages, max(1, args.messages // args.batch)

    with tempfile.TemporaryDirectory(prefix="pilotlab-bench-") as tmp:
        stack = Stack(Path(tmp) / "stack")
        try:
            state = stack.up()
            ensure_topics(state.kafka_bootstrap, partitions=4)
            from confluent_kafka.admin import AdminClient, NewTopic  # noqa: PLC0415

            admin = AdminClient({"bootstrap.servers": state.kafka_bootstrap})
            admin.create_topics([NewTopic("pilotlab.bench-raw", 4, 1)])["pilotlab.bench-raw"].result(30)
            exp = experiment()
            registry.publish(state.kafka_bootstrap, [exp])
            ep = MqttEndpoint.parse(state.mqtt_url)
            single = payloads(exp, n_single, 1, run=1)
            batched = payloads(exp, n_batched, args.batch, run=2)
            sample_single = orjson.dumps(
                {"experiment_id": exp.id, "device_id": "bench-000", "group": "treatment", "received_ms": 0,
                 "readings": [[1, 1, {"no2": 30.5, "pm25": 9.25}]]}
            )  # fmt: skip

            results: dict[str, float] = {}
            results["raw_mqtt_msgs_per_s"] = raw_mqtt(ep, single)
            results["raw_kafka_records_per_s"] = raw_kafka(state.kafka_bootstrap, [sample_single] * n_single)
            with Services(state, Path(tmp) / "services").start("ingest") as services:
                services.wait_ingest_ready()
                through_ingest(ep, services, payloads(exp, 200, 1, run=3))  # warm-up
                results["ingest_single_msgs_per_s"] = through_ingest(ep, services, single)
                results["ingest_batched_msgs_per_s"] = through_ingest(ep, services, batched)
        finally:
            stack.down(purge=True)

    r = results
    figures = {
        "messages": {"single": n_single, "batched": n_batched, "readings_per_batch": args.batch},
        "raw_mqtt_msgs_per_s": r["raw_mqtt_msgs_per_s"],
        "raw_kafka_records_per_s": r["raw_kafka_records_per_s"],
        "ingest_single_msgs_per_s": r["ingest_single_msgs_per_s"],
        "ingest_single_datapoints_per_s": r["ingest_single_msgs_per_s"] * METRICS_PER_READING,
        "ingest_batched_msgs_per_s": r["ingest_batched_msgs_per_s"],
        "ingest_batched_datapoints_per_s": r["ingest_batched_msgs_per_s"] * args.batch * METRICS_PER_READING,
        "ratio_ingest_single_to_raw_mqtt": r["ingest_single_msgs_per_s"] / r["raw_mqtt_msgs_per_s"],
        "ratio_ingest_single_to_raw_kafka": r["ingest_single_msgs_per_s"] / r["raw_kafka_records_per_s"],
        "ratio_batched_to_single_datapoints": (r["ingest_batched_msgs_per_s"] * args.batch)
        / r["ingest_single_msgs_per_s"],
    }
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    print(f"ingest benchmark: {n_single} single messages, {n_batched} messages of {args.batch} readings, "
          f"{METRICS_PER_READING} metrics per reading, QoS 1, acks=all")  # fmt: skip
    print(f"  raw Mosquitto pub→sub      {figures['raw_mqtt_msgs_per_s']:10,.0f} msg/s")
    print(f"  raw Kafka produce          {figures['raw_kafka_records_per_s']:10,.0f} records/s")
    print(f"  ingest, single readings    {figures['ingest_single_msgs_per_s']:10,.0f} msg/s  "
          f"{figures['ingest_single_datapoints_per_s']:10,.0f} datapoints/s")  # fmt: skip
    print(f"  ingest, batches of {args.batch:<3}     {figures['ingest_batched_msgs_per_s']:10,.0f} msg/s  "
          f"{figures['ingest_batched_datapoints_per_s']:10,.0f} datapoints/s")  # fmt: skip
    print(f"  ratios: ingest single / raw MQTT = {figures['ratio_ingest_single_to_raw_mqtt']:.2f}; "
          f"ingest single / raw Kafka = {figures['ratio_ingest_single_to_raw_kafka']:.2f}; "
          f"batched / single readings per s = {figures['ratio_batched_to_single_datapoints']:.1f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
