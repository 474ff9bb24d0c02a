"""The end-to-end benchmark's load generator: the workload contract's messages at a target
rate (datapoints/s) for a fixed duration, or as fast as possible for a fixed count.

Each message goes to ``pilots/{experiment}/{device}/telemetry`` with QoS 1 and is pilotlab's
native JSON array of R readings (pm25, pm10, no2: 3 datapoints each); the ``ts`` of its last
reading is the publish time in ms (wall clock, UTC), the earlier ones 1 ms apart before it,
and ``seq`` runs ``seq_base + i*R ... + R-1`` (so the last reading has ``seq % R == R-1``).
Devices take turns; a device's next message never reuses a ``ts`` of its previous one.

Pacing: message i is due at ``i / messages_per_s`` after the start; the payload is built and
stamped when it is due (or late), then written to its connection's socket at once
(``bench.e2e.mqtt_wire.WirePool``: two connections, a topic keeps its connection, at most
1,000 PUBACKs outstanding per connection, PUBACKs read while waiting for the next due time);
the run ends once every PUBACK is in. The publisher writes MQTT packets itself rather than
through paho, whose per-message cost took about 4 µs of CPU per datapoint from the box the
pipeline is measured on (mqtt_wire's docstring); every peer gets the same publisher. What
the publisher achieved is reported, never assumed: the achieved rate, how far behind
schedule the worst message was, and the publish time of every message (a float64 file).

Run as its own process (so its CPU is measured apart from the harness):

    python bench/e2e/load.py --mqtt-url mqtt://u:p@127.0.0.1:1883 --rate 10000 --duration 30 \
        --out run.json --times run.times
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from array import array
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.e2e.mqtt_wire import WirePool
from pilotlab.contracts import telemetry_topic

METRICS = ("pm25", "pm10", "no2")
EXPERIMENT = "bench-e2e"


def device_ids(n: int) -> list[str]:
    return [f"bench-d{i:04d}" for i in range(n)]


@dataclass
class LoadResult:
    target_datapoints_per_s: float  # 0: as fast as possible
    messages: int
    datapoints: int
    first_publish: float  # epoch seconds
    last_publish: float
    all_acked: float
    achieved_datapoints_per_s: float  # over first → last publish (written to the socket)
    acked_datapoints_per_s: float  # over first publish → every PUBACK received
    max_behind_schedule_s: float
    kept_up: bool  # achieved >= 98% of the target (always true when unpaced)
    seq_base: int
    readings_per_message: int
    cpu_s: float = 0.0  # this process's CPU (all threads) over its whole life, start-up included


def payload(seq0: int, last_ms: int, readings: int) -> bytes:
    """One message: ``readings`` readings ending at ``last_ms``, seqs ``seq0 .. seq0+R-1``."""
    items = []
    for j in range(readings):
        s = seq0 + j
        items.append(
            {
                "seq": s,
                "ts": last_ms - (readings - 1 - j),
                "metrics": {"pm25": 8.0 + (s % 23) * 0.5, "pm10": 15.0 + (s % 19), "no2": 20.0 + (s % 29) * 0.75},
            }
        )
    return orjson.dumps(items)


def run(
    mqtt_url: str,
    *,
    rate: float,
    duration: float = 0.0,
    datapoints: int = 0,
    devices: int = 200,
    readings: int = 10,
    seq_base: int = 0,
    connections: int = 2,
    experiment: str = EXPERIMENT,
    times_out: Path | None = None,
) -> LoadResult:
    """``rate`` datapoints/s for ``duration`` s, or (``rate`` 0) ``datapoints`` as fast as possible."""
    per_msg = readings * len(METRICS)
    n = max(1, round(rate * duration / per_msg)) if rate > 0 else max(1, datapoints // per_msg)
    interval = per_msg / rate if rate > 0 else 0.0
    ids = device_ids(devices)
    topics = [telemetry_topic(experiment, d) for d in ids]
    last_ts = [0] * devices
    stamps = array("d")
    behind = [0.0]
    if seq_base % readings:
        raise ValueError("seq_base must be a multiple of the readings per message")

    def messages(start: float) -> Iterator[tuple[float, str, bytes]]:
        for i in range(n):
            due = start + i * interval
            wait = due - time.monotonic()
            if wait > 0.0005:
                pool.sleep(wait)
            elif wait < 0:
                behind[0] = max(behind[0], -wait)
            now = time.time()
            k = i % devices
            last_ms = max(int(now * 1000), last_ts[k] + readings)
            last_ts[k] = last_ms
            stamps.append(now)
            yield 0.0, topics[k], payload(seq_base + i * readings, last_ms, readings)

    with WirePool(mqtt_url, connections=connections, client_id=f"bench-e2e-load-{seq_base}") as pool:
        start = time.monotonic()
        for _, topic, body in messages(start):
            pool.publish(topic, body)
        pool.wait_acked(timeout=300)
        acked = time.time()
    if times_out is not None:
        with open(times_out, "wb") as fh:
            stamps.tofile(fh)
    span = stamps[-1] - stamps[0]
    achieved = (n - 1) * per_msg / span if span > 0 else float("inf")
    return LoadResult(
        target_datapoints_per_s=rate,
        messages=n,
        datapoints=n * per_msg,
        first_publish=stamps[0],
        last_publish=stamps[-1],
        all_acked=acked,
        achieved_datapoints_per_s=achieved if n > 1 else 0.0,
        acked_datapoints_per_s=n * per_msg / (acked - stamps[0]) if acked > stamps[0] else 0.0,
        max_behind_schedule_s=behind[0],
        kept_up=rate <= 0 or n == 1 or achieved >= 0.98 * rate,
        seq_base=seq_base,
        readings_per_message=readings,
        cpu_s=time.process_time(),
    )


def read_times(path: Path) -> array:
    out = array("d")
    with open(path, "rb") as fh:
        out.frombytes(fh.read())
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mqtt-url", required=True)
    ap.add_argument("--rate", type=float, default=0.0, help="datapoints/s; 0: as fast as possible")
    ap.add_argument("--duration", type=float, default=0.0, help="seconds (with --rate)")
    ap.add_argument("--datapoints", type=int, default=0, help="how many (with --rate 0)")
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--readings", type=int, default=10, help="readings per message")
    ap.add_argument("--seq-base", type=int, default=0)
    ap.add_argument("--connections", type=int, default=2)
    ap.add_argument("--experiment", default=EXPERIMENT)
    ap.add_argument("--out", type=Path, required=True, help="result JSON")
    ap.add_argument("--times", type=Path, help="publish time of every message (float64 epoch seconds)")
    a = ap.parse_args()
    if (a.rate > 0) == (a.datapoints > 0) or (a.rate > 0 and a.duration <= 0):
        ap.error("give --rate with --duration, or --datapoints (as fast as possible)")
    res = run(
        a.mqtt_url,
        rate=a.rate,
        duration=a.duration,
        datapoints=a.datapoints,
        devices=a.devices,
        readings=a.readings,
        seq_base=a.seq_base,
        connections=a.connections,
        experiment=a.experiment,
        times_out=a.times,
    )
    a.out.write_text(json.dumps(asdict(res), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
