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
"""

from __future__ import annotations

import argparse
import json
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

from control.services import Services
from control.stack import Stack
from pilotlab import registry
from pilotlab.contracts import telemetry_topic, to_ms, utcnow
from pilotlab.credentials import MqttEndpoint
from pilotlab.kafka_admin import ensure_topics
from pilotlab.manifest import Experiment

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=5000, help="messages per single-payload run")
    ap.add_argument("--batch", type=int, default=10, help="readings per batched message")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
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
