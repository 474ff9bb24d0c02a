"""pilotlab.health (liveness, readiness, one HTTP port for /metrics, /healthz, /readyz) and
pilotlab.lag (lag per partition from end offsets, in a thread that never raises)."""

from __future__ import annotations

import json
import sys
import threading
import urllib.error
import urllib.request

import pytest
from confluent_kafka import KafkaError, KafkaException
from prometheus_client import CollectorRegistry, Counter, Gauge

from control.stack import free_port
from control.supervisor import Supervisor
from pilotlab.health import Health, serve
from pilotlab.lag import LagMonitor
from pilotlab.settings import SinkSettings
from storage import metrics


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_alive_while_the_loop_beats_ready_when_every_condition_holds() -> None:
    clock = Clock()
    h = Health("svc", ("db", "assigned"), stale_after_s=60, clock=clock)
    loaded = threading.Event()
    h.watch("registry", loaded.is_set)
    assert h.alive()[0] is True
    ok, body = h.ready()
    assert ok is False and body["conditions"] == {"db": False, "assigned": False, "registry": False}
    h.set("db", True)
    h.set("assigned", True)
    loaded.set()
    assert h.ready()[0] is True and h.is_ready() == 1.0
    clock.t += 61  # the loop stopped beating: neither alive nor ready
    assert h.alive()[0] is False and h.ready()[0] is False
    h.beat()
    assert h.alive()[0] is True
    h.set("assigned", False)  # a rebalance
    assert h.ready() == (
        False,
        {
            "service": "svc",
            "ready": False,
            "alive": True,
            "conditions": {"db": True, "assigned": False, "registry": True},
        },
    )


def test_a_watched_thread_that_ended_is_not_alive() -> None:
    h = Health("svc")
    t = threading.Thread(target=lambda: None)
    h.watch_thread("worker", lambda: t)
    assert h.alive()[0] is True  # not started yet: fine
    t.start()
    t.join()
    ok, body = h.alive()
    assert ok is False and body["threads_ended"] == ["worker"]


def test_a_failing_readiness_check_reads_as_not_ready() -> None:
    h = Health("svc")
    h.watch("broken", lambda: 1 / 0)
    assert h.ready()[0] is False


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_one_port_serves_metrics_healthz_and_readyz() -> None:
    registry = CollectorRegistry()
    Counter("pilotlab_test_things_total", "things", registry=registry).inc(3)
    h = Health("svc", ("db",))
    server = serve(0, h, setting="TEST", addr="127.0.0.1", registry=registry)
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        status, body = get(base + "/metrics")
        assert status == 200 and "pilotlab_test_things_total 3.0" in body
        assert get(base + "/")[0] == 200
        status, body = get(base + "/healthz")
        assert status == 200 and json.loads(body)["alive"] is True
        status, body = get(base + "/readyz")
        assert status == 503 and json.loads(body)["conditions"] == {"db": False}
        h.set("db", True)
        assert get(base + "/readyz")[0] == 200
        assert get(base + "/nope")[0] == 404
    finally:
        server.shutdown()
        server.server_close()


def test_a_port_in_use_is_an_error_naming_the_setting() -> None:
    first = serve(0, Health("a"), setting="X", addr="127.0.0.1")
    try:
        with pytest.raises(OSError, match="PILOTLAB_X_METRICS_PORT"):
            serve(
                first.server_port,
                Health("b"),
                setting="PILOTLAB_X_METRICS_PORT",
                addr="127.0.0.1",
                attempts=2,
                wait_s=0.05,
            )
    finally:
        first.shutdown()
        first.server_close()


def test_the_supervisors_restarted_child_serves_the_same_port(tmp_path) -> None:
    """The port belongs to the child (the supervisor never binds it). A child that served and
    answered a request (the server closed first: its side in TIME_WAIT), then died, is followed by
    one that binds the same port at once."""
    port = free_port()
    marker = tmp_path / "runs"
    script = (
        "import os, pathlib, sys, urllib.request\n"
        "from pilotlab.health import Health, serve\n"
        f"p = pathlib.Path({str(marker)!r}); n = int(p.read_text()) + 1 if p.exists() else 1\n"
        "p.write_text(str(n))\n"
        f"server = serve({port}, Health('svc'), setting='TEST', addr='127.0.0.1', attempts=1)\n"
        f"assert urllib.request.urlopen('http://127.0.0.1:{port}/healthz', timeout=5).status == 200\n"
        "print('served', n, flush=True)\n"
        "os._exit(1 if n == 1 else 0)\n"
    )
    sup = Supervisor("svc", [sys.executable, "-c", script], min_backoff=0.05)
    assert sup.run() == 0
    assert marker.read_text() == "2" and sup.restarts == 1


# --- lag --------------------------------------------------------------------------------------


def lag_metrics():
    registry = CollectorRegistry()
    gauge = Gauge("lag_records", "lag", ["topic", "partition"], registry=registry)
    updated = Gauge("lag_updated", "when", registry=registry)
    errors = Counter("lag_errors_total", "errors", registry=registry)
    return registry, gauge, updated, errors


def test_lag_is_end_minus_position_per_partition_and_revoked_partitions_disappear() -> None:
    registry, gauge, updated, errors = lag_metrics()
    ends = {("t", 0): 10, ("t", 1): 7, ("t", 2): 5}
    owned = {("t", 0): 4, ("t", 1): None, ("t", 2): 5}
    asked: list[list] = []

    def end_offsets(_bootstrap, partitions):
        asked.append(partitions)
        return {tp: ends[tp] for tp in partitions}

    mon = LagMonitor(
        "b",
        lambda: owned,
        gauge,
        updated=updated,
        errors=errors,
        end_offsets=end_offsets,
        resolve=lambda tps: dict.fromkeys(tps, 3),
    )
    assert mon.update() is True
    value = lambda p: registry.get_sample_value("lag_records", {"topic": "t", "partition": str(p)})  # noqa: E731
    assert (value(0), value(1), value(2)) == (6, 4, 0)  # partition 1: its committed offset, 3
    assert asked == [[("t", 0), ("t", 1), ("t", 2)]]  # one end-offset read for all partitions
    assert registry.get_sample_value("lag_updated") > 0
    del owned[("t", 0)]  # revoked
    assert mon.update() is True
    assert value(0) is None and value(2) == 0


def test_lag_monitor_never_raises_and_skips_while_positions_are_unknown() -> None:
    registry, gauge, updated, errors = lag_metrics()
    state = {"positions": None}

    def broken(_bootstrap, _partitions):
        raise RuntimeError("broker down")

    mon = LagMonitor("b", lambda: state["positions"], gauge, updated=updated, errors=errors, end_offsets=broken)
    assert mon.update() is None  # rebalancing: nothing read, nothing set
    state["positions"] = {("t", 0): 1}
    assert mon.update() is False
    assert registry.get_sample_value("lag_errors_total") == 1
    assert registry.get_sample_value("lag_updated") == 0


def test_lag_thread_updates_in_the_background() -> None:
    registry, gauge, updated, errors = lag_metrics()
    done = threading.Event()

    def end_offsets(_bootstrap, partitions):
        done.set()
        return dict.fromkeys(partitions, 9)

    mon = LagMonitor(
        "b", lambda: {("t", 0): 2}, gauge, updated=updated, errors=errors, end_offsets=end_offsets, interval_s=60
    ).start()
    try:
        assert done.wait(5)
        for _ in range(50):
            if registry.get_sample_value("lag_records", {"topic": "t", "partition": "0"}) == 7:
                break
            threading.Event().wait(0.05)
        assert registry.get_sample_value("lag_records", {"topic": "t", "partition": "0"}) == 7
    finally:
        mon.stop()


# --- the sink's readiness after a Kafka outage --------------------------------------------------


def test_sink_ready_again_after_every_broker_was_down_without_traffic(monkeypatch) -> None:
    """all-brokers-down makes /readyz 503; once a metadata request answers (asked at most every
    5 s, from the sink's own loop) it is 200 again, even with nothing to consume."""
    obs = metrics.SinkObserver(SinkSettings(kafka_bootstrap="127.0.0.1:1", database_url="postgresql://w@h/db"))
    obs.database(True)
    obs.on_assign(None, [])
    assert obs.health.ready()[0] is True
    obs.client_error(KafkaError(KafkaError._ALL_BROKERS_DOWN))
    assert obs.health.ready()[1]["conditions"]["kafka_reachable"] is False

    class Consumer:
        up = False
        asked = 0

        def list_topics(self, timeout):
            self.asked += 1
            if not self.up:
                raise KafkaException(KafkaError(KafkaError._TRANSPORT))

    clock = Clock()
    monkeypatch.setattr(metrics.time, "monotonic", clock)
    consumer = Consumer()
    obs.probe_kafka(consumer)
    obs.probe_kafka(consumer)  # within 5 s: not asked again
    assert consumer.asked == 1 and obs.health.ready()[0] is False
    consumer.up = True
    clock.t += 5
    obs.probe_kafka(consumer)
    assert consumer.asked == 2 and obs.health.ready()[0] is True
    obs.probe_kafka(consumer)  # reachable: nothing asked
    assert consumer.asked == 2
