"""CPU microbenchmark of the streams worker's pure path, without Kafka or Faust.

The end-to-end benchmark's workload (``bench/e2e/load.py``: 200 devices taking turns, each
message 10 readings 1 ms apart × pm25, pm10, no2 = 30 datapoints; the KPIs of
``bench/bench_e2e.py``'s ``experiment()``: pm25 count, no2 mean and pm10 p95 over 1 minute,
no2 impact), as ingest hands it to Kafka (``ReadingBatch.to_json``), in event time at
``--rate`` datapoints/s. Ingest keys every record by its experiment, so the worker sees all
of them on one partition, in chunks of ``--chunk`` messages (default 1,000; the worker's
chunks of ``streams_chunk_max`` records hold more since ingest packs messages into records,
``ingest.pack``). Per chunk, what the agent does between Faust handing it the events and
the sends (``streams.app._compute_kpis`` and ``write_chunk``): ``ReadingBatch.from_json``,
``run_chunk`` over a ``Chunk`` on a dict of stored entries, the outputs encoded (KPIs, late
readings, status changes) and the chunk's writes stored back in the dict.

``--warmup`` messages first bring the state to a steady size (the duplicate screen's memory
fills up), then ``--messages`` are timed with ``time.process_time``; best of ``--repeat``.
Prints CPU µs per datapoint; ``--profile`` prints a cProfile of one timed run instead.

    python bench/bench_streams_engine.py [--messages 20000] [--chunk 1000] [--profile]

For a breakdown without cProfile's per-call overhead (which inflates small functions):
``py-spy record -r 250 -f raw -o spy.txt -- python bench/bench_streams_engine.py --repeat 2``.
At 40,000 dp/s the worker's 300 ms chunk wait closes chunks of about 400 messages (``--chunk 400``).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

from bench_e2e import experiment  # noqa: E402
from e2e.load import METRICS  # noqa: E402

from pilotlab.contracts import Reading, ReadingBatch, encode_kpis, to_ms, utcnow  # noqa: E402
from pilotlab.settings import StreamsSettings  # noqa: E402
from streams.checkpoint import Chunk, collector_paused, run_chunk  # noqa: E402

DEFAULTS = StreamsSettings.model_fields
READINGS = 10  # per message, as load.py sends them


def payloads(exp, n: int, first: int, start_ms: int, rate: float) -> list[bytes]:
    """Messages ``first .. first+n-1`` of load.py's sequence as ingest produces them: device
    ``i % devices``, the last reading at the message's due time (1 ms apart before it),
    values of ``load.payload``."""
    devices = exp.devices
    per_ms = rate / len(METRICS) / READINGS / 1000  # messages per ms
    out = []
    for i in range(first, first + n):
        d = devices[i % len(devices)]
        last_ms = start_ms + int(i / per_ms)  # a device's turns are len(devices) messages apart: > READINGS ms
        readings = []
        for j in range(READINGS):
            s = i * READINGS + j
            metrics = {"pm25": 8.0 + (s % 23) * 0.5, "pm10": 15.0 + (s % 19), "no2": 20.0 + (s % 29) * 0.75}
            readings.append(Reading(s, last_ms - (READINGS - 1 - j), metrics))
        out.append(ReadingBatch(exp.id, d.id, d.group, last_ms + 3, tuple(readings)).to_json())
    return out


class Worker:
    """The agent's work per chunk, on a dict standing for the worker's table."""

    def __init__(self, exp, chunk: int) -> None:
        self.exp, self.chunk_max = exp, chunk
        self.table: dict[str, bytes] = {}
        self.offset = 0
        self.horizon_ms = DEFAULTS["streams_dedup_horizon_s"].default * 1000
        self.memory = DEFAULTS["streams_dedup_instants"].default
        self.sent_bytes = 0

    def run(self, raw: list[bytes]) -> None:
        for lo in range(0, len(raw), self.chunk_max):
            part = raw[lo : lo + self.chunk_max]
            chunk = Chunk(self.table.get, 0)
            with collector_paused():  # as streams.app does
                batches = [ReadingBatch.from_json(value) for value in part]
            messages = [(self.offset + i, batch, self.exp) for i, batch in enumerate(batches)]
            self.offset += len(part)
            with collector_paused():
                out = run_chunk(chunk, messages, horizon_ms=self.horizon_ms, memory=self.memory)
            sent = [encode_kpis(values) for values in out.kpis.values()]
            sent += [held.to_json() for held in out.late] + [t.to_json() for t in out.transitions]
            self.sent_bytes += sum(map(len, sent))
            for k, v in out.writes:
                self.table[k] = v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=20_000, help="timed messages (30 datapoints each)")
    ap.add_argument("--warmup", type=int, default=20_000, help="messages before the timed ones")
    ap.add_argument("--chunk", type=int, default=1000, help="messages per chunk")
    ap.add_argument("--rate", type=float, default=40_000, help="datapoints/s of event time")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="cProfile one timed run")
    a = ap.parse_args()
    exp = experiment(200)
    start_ms = to_ms(utcnow()) - 60_000
    warm = payloads(exp, a.warmup, 0, start_ms, a.rate)
    timed = payloads(exp, a.messages, a.warmup, start_ms, a.rate)
    dps = a.messages * READINGS * len(METRICS)
    best = None
    for _ in range(1 if a.profile else a.repeat):
        worker = Worker(exp, a.chunk)
        worker.run(warm)
        if a.profile:
            prof = cProfile.Profile()
            prof.enable()
            worker.run(timed)
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
            pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
            return
        t = time.process_time()
        worker.run(timed)
        us = (time.process_time() - t) / dps * 1e6
        best = us if best is None else min(best, us)
        print(f"{us:.2f} µs/dp ({a.messages} messages, chunks of {a.chunk}, {len(worker.table)} state keys)")
    print(f"best of {a.repeat}: {best:.2f} CPU µs per datapoint")


if __name__ == "__main__":
    main()
