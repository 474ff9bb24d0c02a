"""The services observed from outside, on the real stack: each one's /metrics, /healthz and
/readyz (pilotlab.health), as Prometheus and docker-compose's healthchecks see them.

- before it is ready a service says so (/readyz 503, naming what it waits for) while /healthz
  says it is alive; once connected, assigned and with the registry loaded, /readyz is 200;
- after publishing known readings, the records-in counters of streams and sink equal what
  reached Kafka (true end offsets) and what was published (ingest's counters, the truth), the
  lag gauges exist for every partition each consumer owns and go to 0, and the metric names
  the pipeline dashboard's Prometheus panel reads are exported;
- a supervised service's child killed with -9 comes back on the same port.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from control.services import Services
from control.stack import free_port
from dashboards.build import build_all
from dashboards.checks import prom_metric_names, prom_targets
from pilotlab import registry
from pilotlab.contracts import KafkaTopics
from pilotlab.kafka_admin import end_offsets
from simulators.publisher import publish
from storage.sink import TOPICS as SINK_TOPICS
from tests.integration.test_end_to_end import make_experiment

pytestmark = pytest.mark.integration

PARTITIONS = 4  # conftest's ensure_topics; the registry has 1


def get(url: str, timeout: float = 3.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(url: str) -> dict[str, dict[frozenset, float]]:
    """metric sample name → {frozenset(labels): value}"""
    status, text = get(url)
    assert status == 200, f"{url}: {status}"
    out: dict[str, dict[frozenset, float]] = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name][frozenset(s.labels.items())] = s.value
    return out


def total(samples: dict[frozenset, float] | None, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for k, v in (samples or {}).items() if want <= k)


def lag_partitions(metrics: dict, name: str) -> dict[tuple[str, int], float]:
    return {(dict(k)["topic"], int(dict(k)["partition"])): v for k, v in metrics.get(name, {}).items()}


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except OSError as exc:  # not listening (yet, or again)
            last = str(exc)
        if last is True:
            return
        time.sleep(0.5)
    raise AssertionError(f"{what} within {timeout:.0f} s; last: {last}")


def first_answers(services: Services, names: tuple[str, ...], timeout: float = 90.0) -> dict[str, list[int]]:
    """Poll /readyz from the start until every service answers 200: the statuses seen."""
    seen: dict[str, list[int]] = {n: [] for n in names}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        services.check_alive()
        for n in names:
            if not seen[n] or seen[n][-1] != 200:
                with contextlib.suppress(OSError):  # not listening yet
                    seen[n].append(get(services.url(n, "/readyz"), timeout=1)[0])
        if all(s and s[-1] == 200 for s in seen.values()):
            return seen
        time.sleep(0.1)
    raise AssertionError(f"not every service ready within {timeout:.0f} s: {seen}")


def child_pid(supervisor_pid: int) -> int | None:
    """The supervisor's child (`pilotlab run NAME --no-supervise`)."""
    path = Path(f"/proc/{supervisor_pid}/task/{supervisor_pid}/children")
    pids = path.read_text().split() if path.exists() else []
    return int(pids[0]) if pids else None


def test_not_ready_while_waiting_alive_all_the_same(stack_state, stack):
    """Deterministically unready: the sink with no database to reach, the streams worker with
    no Kafka. Both answer /healthz 200 (their loops run, waiting) and /readyz 503 saying why."""
    dead = f"127.0.0.1:{free_port()}"
    # its own consumer group: a member that never leaves must not hold up the next test's sink
    env = {"PILOTLAB_DATABASE_URL": f"postgresql://pilotlab_writer:x@{dead}/pilotlab", "PILOTLAB_SINK_GROUP": "unready"}
    with Services(stack_state, stack.logs / "services-metrics-unready", env).start("sink") as services:
        wait_for(lambda: get(services.url("sink", "/healthz"), 1)[0] == 200, 30, "sink /healthz")
        time.sleep(2)
        status, body = get(services.url("sink", "/readyz"))
        assert status == 503 and '"database_connected": false' in body, body
        assert get(services.url("sink", "/healthz"))[0] == 200
        metrics = scrape(services.url("sink"))
        assert total(metrics["pilotlab_sink_ready"]) == 0
    env = {"PILOTLAB_KAFKA_BOOTSTRAP": dead}
    with Services(stack_state, stack.logs / "services-metrics-unready", env).start("streams") as services:
        wait_for(lambda: get(services.url("streams", "/healthz"), 1)[0] == 200, 30, "streams /healthz")
        time.sleep(2)
        status, body = get(services.url("streams", "/readyz"))
        assert status == 503 and '"registry_loaded": false' in body, body
        assert get(services.url("streams", "/healthz"))[0] == 200


def test_metrics_show_records_lag_and_readiness(stack_state, stack):
    exp = make_experiment("metrics-alpha", "ma")
    registry.publish(stack_state.kafka_bootstrap, [exp])
    names = ("ingest", "streams", "sink")
    with Services(stack_state, stack.logs / "services-metrics").start() as services:
        seen = first_answers(services, names)
        # the worker joins its group (tansu: a few seconds) after its port is up: 503 first
        assert seen["streams"][0] == 503, seen
        for n in names:
            assert get(services.url(n, "/healthz"))[0] == 200
            assert get(services.url(n, "/readyz"))[0] == 200

        truth = publish(stack_state.mqtt_url, [exp], seed=21, duration_s=3, batch=3)
        services.wait_drained(len(truth.accepted), sum(truth.rejected.values()), experiment_ids=[exp.id])

        # every partition each consumer owns has a lag gauge, and they all go to 0
        readings_partitions = {(KafkaTopics.READINGS, p) for p in range(PARTITIONS)}
        sink_partitions = {(t, p) for t in SINK_TOPICS for p in range(1 if t == KafkaTopics.REGISTRY else PARTITIONS)}

        def lag_zero() -> bool | str:
            s = lag_partitions(scrape(services.url("streams")), "pilotlab_streams_lag_records")
            k = lag_partitions(scrape(services.url("sink")), "pilotlab_sink_lag_records")
            if (
                set(s) == readings_partitions
                and set(k) == sink_partitions
                and not any(s.values())
                and not any(k.values())
            ):
                return True
            return f"streams {s}; sink {k}"

        wait_for(lag_zero, 60, "every lag gauge at 0")

        ingest = scrape(services.url("ingest"))
        streams = scrape(services.url("streams"))
        sink = scrape(services.url("sink"))
        ends = end_offsets(stack_state.kafka_bootstrap, sorted(sink_partitions))
        in_kafka = defaultdict(int)
        for (topic, _p), end in ends.items():
            in_kafka[topic] += end
        samples = len({(device, ts) for device, _metric, ts in truth.accepted})

        # what was published ...
        assert total(ingest["pilotlab_ingest_messages_total"]) == truth.messages
        assert total(ingest["pilotlab_ingest_forwarded_readings_total"]) == samples
        # ... packed several messages to a record (ingest.pack) ...
        assert total(ingest["pilotlab_ingest_pack_messages_count"]) == in_kafka[KafkaTopics.READINGS]
        assert total(ingest["pilotlab_ingest_pack_messages_sum"]) == truth.messages - sum(truth.rejected.values())
        # ... is what streams took in ...
        assert (
            total(streams["pilotlab_streams_records_in_total"], topic=KafkaTopics.READINGS)
            == in_kafka[KafkaTopics.READINGS]
        )
        assert total(streams["pilotlab_streams_applied_messages_total"]) == in_kafka[KafkaTopics.READINGS]
        assert total(streams["pilotlab_streams_readings_in_total"]) == samples
        assert total(streams["pilotlab_streams_skipped_messages_total"]) == 0
        assert (
            total(streams["pilotlab_streams_records_out_total"], topic=KafkaTopics.KPIS) == in_kafka[KafkaTopics.KPIS]
        )
        assert total(streams["pilotlab_streams_kpi_revisions_total"]) > 0
        assert total(streams["pilotlab_streams_chunk_messages_sum"]) == in_kafka[KafkaTopics.READINGS]
        assert total(streams["pilotlab_streams_chunk_seconds_count"], stage="write") > 0
        assert total(streams["pilotlab_streams_state_keys"]) > 0
        assert total(streams["pilotlab_streams_assigned_partitions"]) == PARTITIONS
        # ... and what the sink consumed and stored
        for topic in SINK_TOPICS:
            got = total(sink["pilotlab_sink_records_total"], topic=topic)
            assert got == in_kafka[topic], f"sink took {got} records of {topic}, Kafka holds {in_kafka[topic]}"
        assert total(sink["pilotlab_sink_rows_written_total"], table="readings") == len(truth.accepted)
        assert total(sink["pilotlab_sink_rows_written_total"], table="rejections") == sum(truth.rejected.values())
        assert total(sink["pilotlab_sink_refused_records_total"]) == 0
        assert total(sink["pilotlab_sink_db_commit_seconds_count"]) == total(sink["pilotlab_sink_batch_records_count"])
        assert total(sink["pilotlab_sink_batch_records_sum"]) == sum(in_kafka.values())
        assert total(sink["pilotlab_sink_assigned_partitions"]) == len(sink_partitions)
        for n, metrics in (("ingest", ingest), ("streams", streams), ("sink", sink)):
            assert total(metrics[f"pilotlab_{n}_ready"]) == 1, n

        # what the pipeline dashboard's lag panel asks Prometheus for is exported
        asked = set().union(*(prom_metric_names(t["expr"]) for _, t in prom_targets(build_all()["pilotlab-pipeline"])))
        assert asked and asked <= set(streams) | set(sink)

        # a supervised service's child dies: the supervisor starts another, on the same port
        sink_child = child_pid(services.procs["sink"].pid)
        assert sink_child is not None
        started = total(sink["process_start_time_seconds"])
        os.kill(sink_child, signal.SIGKILL)

        def back() -> bool | str:
            try:
                status, _ = get(services.url("sink", "/readyz"), 1)
                now = total(scrape(services.url("sink"))["process_start_time_seconds"])
            except (OSError, AssertionError) as exc:
                return str(exc)
            return True if status == 200 and now > started else f"/readyz {status}, started {now}"

        wait_for(back, 60, "the restarted sink ready on its port")
        assert services.procs["sink"].poll() is None, "the supervisor itself stays"
        assert child_pid(services.procs["sink"].pid) not in (None, sink_child)


def test_ready_again_after_kafka_returns_without_traffic(stack_state, stack):
    """Kafka killed -9: ingest and the sink say not ready (every broker down) while alive; after
    `stack up` they are ready again by themselves, with no record flowing (a metadata probe)."""
    with Services(stack_state, stack.logs / "services-metrics-kafka").start("ingest", "sink") as services:
        services.wait_ready("ingest", "sink")
        assert stack.stop_service("kafka", kill=True)
        try:

            def unready() -> bool | str:
                said = {n: get(services.url(n, "/readyz"), 1) for n in ("ingest", "sink")}
                if all(s == 503 and '"kafka_reachable": false' in body for s, body in said.values()):
                    return True
                return str(said)

            wait_for(unready, 60, "ingest and sink not ready with Kafka down")
            for n in ("ingest", "sink"):
                assert get(services.url(n, "/healthz"))[0] == 200, n
        finally:
            stack.up()
        wait_for(
            lambda: all(get(services.url(n, "/readyz"), 1)[0] == 200 for n in ("ingest", "sink")) or "not yet",
            90,
            "ingest and sink ready again after Kafka came back",
        )
