"""The end-to-end benchmark's peers (bench/peers) against the real embedded Mosquitto and
PostgreSQL: each peer stores exactly the datapoints published, with their values, and the
latency helper sees one last reading per message. The Node-RED peers need Node.js (their npm
packages are installed by .ci/run, or by ensure_node_red here)."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import orjson
import psycopg
import pytest

from bench.peers import NODE_RED_FLOWS, PEERS, PROBE_DEVICE, latency_ms, peer, stored_count
from control.stack import StackState
from pilotlab.contracts import telemetry_topic
from tests.integration.test_end_to_end import publish_raw

pytestmark = pytest.mark.integration

DEVICES, MESSAGES, READINGS = 3, 24, 4
METRICS = ("pm25", "pm10", "no2")
START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def workload() -> tuple[list[tuple[str, bytes]], set[tuple]]:
    """The messages (topic, payload) and the rows (device, metric, ts, value, seq) they hold."""
    messages, rows = [], set()
    for i in range(MESSAGES):
        device = f"bench-d{i % DEVICES:04d}"
        last_ms = START_MS + i * 1000
        items = []
        for j in range(READINGS):
            ts, seq = last_ms - (READINGS - 1 - j), i * READINGS + j
            metrics = {m: round(i * 1.25 + j * 0.5 + k / 7, 6) for k, m in enumerate(METRICS)}
            items.append({"seq": seq, "ts": ts, "metrics": metrics})
            rows |= {
                (device, m, datetime.fromtimestamp(ts / 1000, UTC), v, seq) for m, v in metrics.items()
            }  # fmt: skip
        messages.append((telemetry_topic("bench-e2e", device), orjson.dumps(items)))
    return messages, rows


@pytest.mark.parametrize("name", PEERS)
def test_peer_stores_exactly_what_was_published(name: str, stack_state: StackState, tmp_path: Path) -> None:
    if name in NODE_RED_FLOWS and shutil.which("node") is None:
        pytest.skip("the Node-RED peers need Node.js (node is not installed)")
    messages, expected = workload()
    # small batches so the batched peer flushes both on size and on its timer
    with peer(name, stack_state, tmp_path, batch_rows=50, batch_ms=100) as p:
        publish_raw(stack_state.mqtt_url, messages)
        p.wait_stored(len(expected), timeout=120)
        with psycopg.connect(p.dsn) as conn:
            stored = set(
                conn.execute(
                    "SELECT device_id, metric, ts, value, seq FROM peer_readings WHERE device_id <> %s",
                    [PROBE_DEVICE],
                ).fetchall()
            )
            probes = conn.execute("SELECT count(*) FROM peer_readings WHERE device_id = %s", [PROBE_DEVICE]).fetchone()
        lat = latency_ms(p.dsn, READINGS)
        p.check_alive()
    assert stored_count(p.dsn) == len(expected) == MESSAGES * READINGS * len(METRICS)
    assert stored == expected
    assert probes[0] == 0  # readiness probes are removed before the peer is handed over
    assert lat["messages"] == MESSAGES
    assert lat["p50"] <= lat["p95"] <= lat["p99"]
