"""Faults mid-stream: kill -9 of each broker (Kafka, MQTT, PostgreSQL) and of each service
(ingest, streams, sink) while a simulated pilot publishes, then the one restart an operator
would do — ``pilotlab stack up`` for a broker, starting the service again for a service —
and nothing else: no ``kafka topics``, no ``experiments apply``, no restart of the others.

Each case asserts, against the published ground truth (every message the MQTT broker
acknowledged to the simulated devices): stored readings = published readings (no loss, no
duplicate), stored rejections = published bad messages, every KPI window's value and sample
count = a batch recomputation from the published readings (nothing counted twice), and the
consumer groups' lag back to 0. The seconds from the kill to a drained pipeline are printed
(``-s``) and kept in ``RECOVERY`` for the summary line at the end of the module.

The Kafka broker runs with the default durable storage (``control.objectstore``)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from paho.mqtt.enums import CallbackAPIVersion

from control.services import Services
from control.stack import MQTT_AUTOSAVE_CHANGES, Stack
from pilotlab import registry
from pilotlab.contracts import KafkaTopics, to_ms
from pilotlab.credentials import MqttEndpoint
from pilotlab.kafka_admin import end_offsets, ensure_topics
from simulators.publisher import GroundTruth, plan_messages
from storage.migrate import migrate
from tests.integration.test_crash_recovery import busy, kpis_on_topic
from tests.integration.test_end_to_end import expected_kpis, make_experiment, stored_kpis

pytestmark = pytest.mark.integration

BROKERS = {"kafka": "kafka", "mqtt": "mqtt", "postgres": "postgres"}
SERVICES = ("ingest", "streams", "sink")
RECOVERY: dict[str, dict] = {}


def publish_acknowledged(
    mqtt_url: str, exp, seed: int, duration_s: float, gate: tuple[threading.Event, threading.Event] | None = None
) -> GroundTruth:
    """A simulated pilot's devices publishing with QoS 1 through broker outages: paho keeps
    what it could not send and sends it again after reconnecting (like a device with a
    buffer). Returns once the broker has acknowledged (PUBACK) every message: the ground
    truth is exactly what the broker acknowledged.

    ``gate`` = (halfway, resume): after half the messages the publisher sets ``halfway`` and
    waits for ``resume``, so a fault injected in between always lands mid-stream, however
    slow the machine."""
    truth = GroundTruth()
    planned = list(plan_messages([exp], seed, 1))
    sim_start, sim_end = planned[0][0], planned[-1][0]
    speed = max(1.0, (sim_end - sim_start) / 1000 / duration_s)
    endpoint = MqttEndpoint.parse(mqtt_url)
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"fault-sim-{seed}")
    endpoint.configure(client)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.reconnect_delay_set(min_delay=1, max_delay=2)
    acked: set[int] = set()
    client.on_publish = lambda _c, _u, mid, _rc, _p: acked.add(mid)
    client.connect(endpoint.host, endpoint.port)
    client.loop_start()
    mids = []
    wall_start = time.monotonic()
    try:
        for i, (ts_ms, topic, payload, reason, samples) in enumerate(planned):
            if gate is not None and i == len(planned) // 2:
                held = time.monotonic()
                gate[0].set()
                if not gate[1].wait(300):
                    raise TimeoutError("the publisher was never resumed")
                wall_start += time.monotonic() - held  # the rest at the planned rate
            delay = wall_start + (ts_ms - sim_start) / 1000 / speed - time.monotonic()
            if delay > 0.002:
                time.sleep(delay)
            mids.append(client.publish(topic, payload, qos=1).mid)  # queued if disconnected
            truth.messages += 1
            if reason is not None:
                truth.rejected[reason] += 1
            for smp in samples:
                for metric, value in smp.metrics.items():
                    truth.accepted[(smp.device_id, metric, smp.ts_ms)] = value
        deadline = time.monotonic() + 120
        while not acked.issuperset(mids):
            assert time.monotonic() < deadline, f"{len(set(mids) - acked)} messages never acknowledged"
            time.sleep(0.1)
    finally:
        client.disconnect()
        client.loop_stop()
    return truth


class GatedPublisher:
    """``publish_acknowledged`` in a thread that waits halfway until ``resume()``: a fault
    injected in between lands mid-stream however slow the machine."""

    def __init__(self, mqtt_url: str, exp, seed: int, duration_s: float) -> None:
        self.halfway, self._resume = threading.Event(), threading.Event()
        self._result: dict = {}
        gate = (self.halfway, self._resume)
        self._thread = threading.Thread(
            target=lambda: self._result.setdefault(
                "truth", publish_acknowledged(mqtt_url, exp, seed=seed, duration_s=duration_s, gate=gate)
            )
        )
        self._thread.start()

    def wait_halfway(self) -> None:
        assert self.halfway.wait(120), "the publisher did not get halfway"

    def resume(self) -> None:
        self._resume.set()

    def finish(self) -> GroundTruth:
        self._thread.join(timeout=180)
        assert not self._thread.is_alive(), "the publisher did not finish"
        return self._result["truth"]


@pytest.fixture
def durable_stack(tmp_path):
    """A fresh durable stack per fault: each starts from clean brokers and consumer groups."""
    s = Stack(tmp_path / "stack")
    try:
        state = s.up()
        assert state.kafka_storage == "durable"
        migrate(state.database_url)
        ensure_topics(state.kafka_bootstrap, partitions=4)
        yield s, state
    finally:
        s.down(purge=True)


def service_warnings(logs: Path | None) -> list[str]:
    """The WARNING and ERROR lines of the services' logs (what a failed comparison shows)."""
    if logs is None:
        return []
    return [
        line[:300]
        for log in sorted(logs.glob("*.log"))
        for line in log.read_text(errors="replace").splitlines()
        if "[WARNING]" in line or "[ERROR]" in line or " WARNING " in line or " ERROR " in line
    ][-20:]


def assert_exact(state, exp, truth, victim: str, logs: Path | None = None) -> None:
    with psycopg.connect(state.database_url) as conn:
        rows = conn.execute(
            "SELECT device_id, metric, ts, value FROM readings WHERE experiment_id = %s", (exp.id,)
        ).fetchall()
        stored = {(d, m, to_ms(ts)): v for d, m, ts, v in rows}
        lost = set(truth.accepted) - set(stored)
        extra = set(stored) - set(truth.accepted)
        assert not lost and not extra, f"{victim}: {len(lost)} readings lost, {len(extra)} not published"
        assert stored == truth.accepted
        rejections = conn.execute("SELECT count(*) FROM rejections WHERE experiment_id = %s", (exp.id,)).fetchone()[0]
        assert rejections == sum(truth.rejected.values())

        want = expected_kpis(exp, truth.accepted)
        deadline = time.monotonic() + 60
        while True:
            got = stored_kpis(conn, exp.id)
            bad = [
                k
                for k in want
                if k not in got or got[k][1] != want[k][1] or got[k][0] != pytest.approx(want[k][0], rel=1e-9, abs=1e-9)
            ]
            if not bad and got.keys() == want.keys():
                return
            if time.monotonic() > deadline:
                on_topic = kpis_on_topic(state.kafka_bootstrap, exp.id)
                sample = [(k, want[k], got.get(k), "topic max:", on_topic.get(k)) for k in bad[:3]]
                pytest.fail(
                    f"{len(bad)} of {len(want)} KPI windows differ after killing {victim}: {sample}; "
                    f"the services' warnings: {service_warnings(logs)}"
                )
            time.sleep(0.5)
            conn.commit()


@pytest.mark.parametrize("victim", [*BROKERS, *SERVICES])
def test_kill_minus_nine_mid_stream(durable_stack, victim):
    stack, state = durable_stack
    exp = make_experiment(f"fault-{victim}", f"f{victim[:3]}", minutes=300)
    registry.publish(state.kafka_bootstrap, [exp])

    with Services(state, stack.logs / f"services-{victim}").start() as services:
        services.wait_ingest_ready()
        publisher = GatedPublisher(state.mqtt_url, exp, seed=5, duration_s=10)
        try:
            publisher.wait_halfway()
            busy(state.database_url, "streams", exp.id)  # KPIs stored: every service is at work
            busy(state.database_url, "sink", exp.id)
        except BaseException:
            publisher.resume()
            raise
        killed = time.monotonic()
        if victim in BROKERS:
            assert stack.stop_service(BROKERS[victim], kill=True)
            publisher.resume()  # the devices carry on publishing through the outage
            time.sleep(2.0)
            stack.up()  # what an operator runs: restarts exactly what is not running
        else:
            services.kill(victim)
            publisher.resume()
            time.sleep(1.0)
            services.start(victim)
        truth = publisher.finish()
        published = time.monotonic()
        services.wait_drained(len(truth.accepted), sum(truth.rejected.values()), experiment_ids=[exp.id], timeout=180)
        recovered, after_last = time.monotonic() - killed, time.monotonic() - published
        services.check_alive()  # no service exited on its own, nor its supervised child:
        restarts = [
            line
            for log in (stack.logs / f"services-{victim}").glob("*.log")
            for line in log.read_text(errors="replace").splitlines()
            if "pilotlab.supervisor" in line and "exited with code" in line
        ]
        assert not restarts, f"a service stopped on the {victim} fault and was restarted: {restarts}"
        assert_exact(state, exp, truth, victim, stack.logs / f"services-{victim}")
    RECOVERY[victim] = {"published": len(truth.accepted), "recovered_s": round(recovered, 1)}
    print(
        f"\n{victim}: {len(truth.accepted)} readings published = stored; drained {recovered:.1f} s after the kill, "
        f"{after_last:.1f} s after the last message was acknowledged"
    )


class _FaustProtocol(RoundRobinPartitionAssignor):
    """Joins under the name of the streams worker's assignor: tansu keeps an empty group's
    protocol and refuses a member offering another (INCONSISTENT_GROUP_PROTOCOL)."""

    name = "faust"


def commit_past(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    """Join ``group`` alone, commit its offsets of ``topic`` at each partition's end, leave
    (tansu takes no commit from outside a group). Returns what was committed."""
    ends = end_offsets(bootstrap, [(topic, p) for p in range(partitions)])
    want = {TopicPartition(topic, p): ends[(topic, p)] for p in range(partitions)}

    async def commit() -> None:
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
            partition_assignment_strategy=(_FaustProtocol,), session_timeout_ms=6000,
        )  # fmt: skip
        await consumer.start()
        try:
            deadline = time.monotonic() + 90
            while consumer.assignment() != set(want):
                assert time.monotonic() < deadline, f"never assigned all of {topic} in {group}"
                await asyncio.sleep(0.5)
            await consumer.commit(want)
        finally:
            await consumer.stop()

    asyncio.run(commit())
    return {tp.partition: offset for tp, offset in want.items()}


def test_a_commit_ahead_of_the_streams_state_is_sought_back_and_nothing_goes_uncounted(durable_stack):
    """The streams worker commits a readings partition's applied mark, never beyond
    (faust_compat.commit_applied). Should the committed offset still run ahead of the state
    a restarted worker recovers (a changelog read short, a commit racing a rebalance: what
    left a KPI window one reading short once in CI), the readings in between would reach no
    chunk. Here the worker is killed mid-stream, the rest is published and stored, the group's
    offsets are committed at the end of every partition, and the worker restarts: it seeks
    each partition back to its state's mark and the KPIs count every stored reading."""
    stack, state = durable_stack
    exp = make_experiment("fault-ahead", "fahe", minutes=300)
    registry.publish(state.kafka_bootstrap, [exp])
    logs = stack.logs / "services-ahead"
    with Services(state, logs).start() as services:
        services.wait_ingest_ready()
        publisher = GatedPublisher(state.mqtt_url, exp, seed=6, duration_s=6)
        try:
            publisher.wait_halfway()
            busy(state.database_url, "streams", exp.id)
        finally:
            services.kill("streams")
            publisher.resume()
        truth = publisher.finish()
        deadline = time.monotonic() + 120
        with psycopg.connect(state.database_url, autocommit=True) as conn:
            while conn.execute("SELECT count(*) FROM readings WHERE experiment_id = %s", (exp.id,)).fetchone()[0] < len(
                truth.accepted
            ):
                assert time.monotonic() < deadline, "the sink did not store what was published"
                time.sleep(0.5)
        committed = commit_past(state.kafka_bootstrap, "pilotlab-streams", KafkaTopics.READINGS, 4)
        assert sum(committed.values()) > 0
        services.start("streams")
        assert_exact(state, exp, truth, "streams (committed ahead)", logs)
    log = (logs / "streams.log").read_text(errors="replace")
    assert "is ahead of the state's mark" in log, "the worker never found its state behind the commit"


def test_mqtt_killed_while_ingest_is_away_loses_at_most_the_autosave_window(durable_stack):
    """The issue's case: ingest is away (its persistent session queues), 2,000 messages are
    acknowledged to the devices, Mosquitto is killed -9 before anything else happens. With
    autosave on changes (every MQTT_AUTOSAVE_CHANGES) it loses at most about that many of
    them (it lost all 2,000 with ``autosave_interval 5`` seconds). What is stored is exactly
    what was published minus the lost messages' readings, and the KPIs count what is stored."""
    stack, state = durable_stack
    exp = make_experiment("fault-mqtt-away", "fmaw", minutes=600)
    registry.publish(state.kafka_bootstrap, [exp])
    with Services(state, stack.logs / "services-mqtt-away").start() as services:
        services.wait_ingest_ready()
        services.kill("ingest")  # away: its session stays on the broker and queues
        truth = publish_acknowledged(state.mqtt_url, exp, seed=9, duration_s=1)
        assert truth.messages >= 2000
        killed = time.monotonic()
        assert stack.stop_service("mqtt", kill=True)  # right after the last PUBACK: the worst moment
        stack.up()
        services.start("ingest")
        services.wait_ingest_ready()
        with psycopg.connect(state.database_url, autocommit=True) as conn:
            deadline, last, settled = time.monotonic() + 120, -1, time.monotonic()
            while time.monotonic() < deadline:  # until the stored count stops changing
                n = conn.execute("SELECT count(*) FROM readings WHERE experiment_id = %s", (exp.id,)).fetchone()[0]
                if n != last:
                    last, settled = n, time.monotonic()
                elif time.monotonic() - settled > 5 and n > 0:
                    break
                time.sleep(0.5)
            rows = conn.execute(
                "SELECT device_id, metric, ts, value FROM readings WHERE experiment_id = %s", (exp.id,)
            ).fetchall()
        stored = {(d, m, to_ms(ts)): v for d, m, ts, v in rows}
        assert set(stored) <= set(truth.accepted) and all(truth.accepted[k] == v for k, v in stored.items())
        lost_readings = len(truth.accepted) - len(stored)
        per_message = len(truth.accepted) / (truth.messages - sum(truth.rejected.values()))
        lost_messages = round(lost_readings / per_message)
        services.wait_drained(len(stored), 0, experiment_ids=[exp.id], timeout=120)
        recovered = time.monotonic() - killed
        assert lost_messages <= 2 * MQTT_AUTOSAVE_CHANGES, f"{lost_messages} acknowledged messages lost"
        want = expected_kpis(exp, stored)
        deadline = time.monotonic() + 60
        with psycopg.connect(state.database_url, autocommit=True) as conn:
            while (got := stored_kpis(conn, exp.id)) != want or not want:
                close = got.keys() == want.keys() and all(
                    got[k][1] == want[k][1] and got[k][0] == pytest.approx(want[k][0], rel=1e-9, abs=1e-9) for k in want
                )
                if close:
                    break
                assert time.monotonic() < deadline, "KPIs do not count exactly the stored readings"
                time.sleep(0.5)
    RECOVERY["mqtt, ingest away"] = {"published": len(truth.accepted), "lost_messages": lost_messages}
    print(
        f"\nmqtt killed while ingest away: {truth.messages} messages acknowledged, ~{lost_messages} lost "
        f"({lost_readings} readings); drained {recovered:.1f} s after the kill"
    )
