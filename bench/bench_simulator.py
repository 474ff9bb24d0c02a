"""How many messages/s the simulator sustains with 10,000 simulated devices in one process.

Starts its own Mosquitto (anonymous, loopback, a free port), then, side by side in one run:
  1. planning only: the 10k-device scenario's messages generated (models + faults + JSON);
  2. publishing everything as fast as possible (QoS 1, acknowledged) over 1 and 4 connections;
  3. a paced accelerated run at the scenario's speed: does it keep up (worst lag)?

    python bench/bench_simulator.py [--scenario control/examples/scenarios/city-10k.yaml] [--limit 60000]
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from control.stack import free_port, port_answers  # noqa: E402
from simulators.engine import MqttPool, send  # noqa: E402
from simulators.faults import Run  # noqa: E402
from simulators.spec import load_scenario  # noqa: E402


def mosquitto(tmp: Path) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    conf = tmp / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_inflight_messages 1000\nmax_queued_messages 0\n"
    )
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not port_answers(port):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit("mosquitto did not start")
        time.sleep(0.05)
    return proc, f"mqtt://127.0.0.1:{port}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenario", type=Path, default=REPO / "control" / "examples" / "scenarios" / "city-10k.yaml")
    ap.add_argument("--limit", type=int, default=60_000, help="messages per publishing measurement")
    args = ap.parse_args()
    scenario = load_scenario(args.scenario)
    devices = sum(len(e.devices) for e in scenario.resolved)
    anchor = datetime.now(UTC).replace(second=0, microsecond=0)
    print(f"scenario {scenario.name}: {devices} devices, {scenario.span()} simulated, speed {scenario.speed:g}")

    t = time.perf_counter()
    planned = [(m.send_ms, m.topic, m.payload) for m in Run(scenario, anchor).messages()]
    plan_s = time.perf_counter() - t
    print(f"planning only:        {len(planned):>7} messages in {plan_s:6.2f} s = {len(planned) / plan_s:8.0f} msg/s")

    with tempfile.TemporaryDirectory() as tmp:
        proc, url = mosquitto(Path(tmp))
        try:
            for conns in (1, 4):
                batch = [(0.0, topic, payload) for _, topic, payload in planned[: args.limit]]
                with MqttPool(url, connections=conns, client_id=f"bench-{conns}") as pool:
                    stats = send(pool, batch)
                print(f"publish, {conns} connection{'s' if conns > 1 else ' '}: {stats.messages:>7} messages in "
                      f"{stats.wall_s:6.2f} s = {stats.rate:8.0f} msg/s (QoS 1, all acknowledged)")
            # paced: the whole pipeline of planning + pacing + publishing, as `pilotlab simulate` runs it
            run = Run(scenario, anchor)
            msgs = ((run.wall_offset_s(m.send_ms), m.topic, m.payload) for m in run.messages())
            msgs = itertools.islice(msgs, args.limit)
            with MqttPool(url, connections=4, client_id="bench-paced") as pool:
                stats = send(pool, msgs)
            need = len(planned) / run.wall_duration_s()
            print(f"paced at ×{scenario.speed:g}: {stats.messages:>7} messages in {stats.wall_s:6.2f} s = "
                  f"{stats.rate:8.0f} msg/s; schedule needs {need:.0f} msg/s; worst lag {stats.max_lag_s:.2f} s")
        finally:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
