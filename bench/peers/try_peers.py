"""Try the peers alone: start an embedded stack in a temporary directory, run each peer with a
fixed workload and print datapoints/s and publish→stored latency for each.

    python bench/peers/try_peers.py [--devices 20] [--messages 2000] [--readings 10] [--peers nodered,...]
    python -m bench.peers ...           # the same

The workload follows the end-to-end benchmark's contract: message i goes to
``pilots/bench-e2e/bench-d{i % D:04d}/telemetry`` (QoS 1) and holds R readings of pm25, pm10
and no2; the last reading's ``ts`` is the publish time in ms, the earlier ones 1 ms apart before
it (a device's next message never reuses a ts), ``seq = i * R + j``. One paho client publishes
every message as fast as it goes. Throughput = datapoints / (first publish → last row stored);
latency = ``stored_at - ts`` of each message's last reading (see bench.peers.latency_ms).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.peers import NODE_RED_FLOWS, PEERS, _node_red_installed, ensure_node_red, latency_ms, peer, versions
from control.stack import Stack
from pilotlab.contracts import telemetry_topic
from pilotlab.credentials import MqttEndpoint

EXPERIMENT = "bench-e2e"
METRICS = ("pm25", "pm10", "no2")


def publish(ep: MqttEndpoint, devices: int, messages: int, readings: int) -> tuple[float, float]:
    """Publish the workload with one QoS 1 client; returns the epoch seconds of the first publish
    and of the last PUBACK."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"peer-load-{uuid.uuid4().hex[:8]}")
    ep.configure(client)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect(ep.host, ep.port)
    client.loop_start()
    last_ts: dict[int, int] = {}
    topics = [telemetry_topic(EXPERIMENT, f"bench-d{d:04d}") for d in range(devices)]
    first = time.time()
    info = None
    try:
        for i in range(messages):
            d = i % devices
            end = max(int(time.time() * 1000), last_ts.get(d, 0) + readings)
            last_ts[d] = end
            items = [
                {
                    "seq": i * readings + j,
                    "ts": end - (readings - 1 - j),
                    "metrics": {m: round(10.0 + (i * 7 + j * 3 + k) % 97 / 3, 3) for k, m in enumerate(METRICS)},
                }
                for j in range(readings)
            ]
            info = client.publish(topics[d], json.dumps(items), qos=1)
        if info is not None:
            info.wait_for_publish(120)
        acked = time.time()
    finally:
        client.disconnect()
        client.loop_stop()
    return first, acked


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--readings", type=int, default=10, help="readings per message (3 datapoints each)")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated, of {', '.join(PEERS)}")
    ap.add_argument("--batch-rows", type=int, default=5000)
    ap.add_argument("--batch-ms", type=int, default=200)
    args = ap.parse_args()
    names = [n for n in args.peers.split(",") if n]
    datapoints = args.messages * args.readings * len(METRICS)

    if any(n in NODE_RED_FLOWS for n in names) and not _node_red_installed():
        t = time.monotonic()
        ensure_node_red()
        print(f"npm ci for Node-RED took {time.monotonic() - t:.1f} s")
    v = versions()
    print(f"node {v['node']}, node-red {v['node-red']}, pg {v['pg']}")
    print(f"workload: {args.devices} devices, {args.messages} messages x {args.readings} readings x "
          f"{len(METRICS)} metrics = {datapoints:,} datapoints, one paho QoS 1 publisher, unpaced")  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="pilotlab-peers-") as tmp:
        stack = Stack(Path(tmp) / "stack")
        try:
            state = stack.up()
            ep = MqttEndpoint.parse(state.mqtt_url)
            for name in names:
                t = time.monotonic()
                with peer(name, state, Path(tmp) / "peers", batch_rows=args.batch_rows, batch_ms=args.batch_ms) as p:
                    ready_s = time.monotonic() - t
                    first, acked = publish(ep, args.devices, args.messages, args.readings)
                    last = p.wait_stored(datapoints)
                    lat = latency_ms(p.dsn, args.readings)
                    stored = p.count()
                rate, published = datapoints / (last - first), datapoints / (acked - first)
                print(f"  {name:16} {rate:10,.0f} datapoints/s  latency p50 {lat['p50']:8.1f} ms  "
                      f"p95 {lat['p95']:8.1f} ms  p99 {lat['p99']:8.1f} ms  ({stored:,} rows, "
                      f"{lat['messages']} messages; published at {published:,.0f} datapoints/s; "
                      f"ready in {ready_s:.1f} s)", flush=True)  # fmt: skip
        finally:
            stack.down(purge=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
