"""The ingest service: MQTT (QoS 1, persistent shared subscription) → Kafka.

A message is acknowledged to the MQTT broker only after Kafka has confirmed every record
it produced (acks=all): if ingest dies first, the broker redelivers it. Redeliveries are
harmless downstream (natural keys). Rejections go to the dead-letter topic and to the
device's feedback topic, so the startup sees why, live.
"""

from __future__ import annotations

import gc
import logging
import signal
import threading
import time

import orjson
import paho.mqtt.client as mqtt
from confluent_kafka import KafkaError, KafkaException, Producer
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client import Counter, Gauge, Histogram

from ingest.dedup import SeqMemory, ValueMemory
from ingest.pack import Pack, Packer
from ingest.pipeline import handle, remember, screen_conflicts, screen_duplicates
from pilotlab.contracts import TELEMETRY_SUBSCRIPTION, KafkaTopics, Limits, Reason, feedback_topic
from pilotlab.credentials import MqttEndpoint
from pilotlab.errorlog import ErrorLog
from pilotlab.health import Health, serve
from pilotlab.registry import RegistryFollower
from pilotlab.settings import IngestSettings

log = logging.getLogger("pilotlab.ingest")

MESSAGES = Counter("pilotlab_ingest_messages_total", "MQTT messages received")
READINGS = Counter("pilotlab_ingest_readings_total", "Readings accepted (handed to Kafka)")
FORWARDED = Counter("pilotlab_ingest_forwarded_readings_total", "Readings Kafka confirmed (acks=all)")
ACKED = Counter("pilotlab_ingest_acked_messages_total", "MQTT messages acknowledged after Kafka confirmed")
INFLIGHT = Gauge("pilotlab_ingest_inflight_messages", "MQTT messages awaiting Kafka confirmation")
REJECTED = Counter("pilotlab_ingest_rejections_total", "Rejected messages or items", ["reason"])
REPEATED = Counter(
    "pilotlab_ingest_repeated_readings_total",
    "Metric values repeating an accepted (device, metric, ts) with the same value: dropped, idempotent",
)
SUBSCRIBED = Gauge("pilotlab_ingest_subscribed", "1 once the telemetry subscription is acknowledged")
# broker trouble: counted and logged with its cause (pilotlab.errorlog); ingest waits, never exits on it
KAFKA_ERRORS = Counter(
    "pilotlab_ingest_kafka_errors_total", "Kafka client errors and failed deliveries (broker down...)", ["error"]
)
KAFKA_CONNECTED = Gauge("pilotlab_ingest_kafka_connected", "0 while the Kafka client reports every broker down")
REPRODUCED = Counter(
    "pilotlab_ingest_reproduced_records_total", "Records produced again after Kafka did not confirm them"
)
REDELIVERED = Counter(
    "pilotlab_ingest_redelivered_messages_total", "Messages the MQTT broker sent again that ingest had handled"
)
MQTT_DISCONNECTS = Counter("pilotlab_ingest_mqtt_disconnects_total", "Connections to the MQTT broker lost or refused")
READY = Gauge("pilotlab_ingest_ready", "1 when /readyz answers 200")
PACKED = Histogram(
    "pilotlab_ingest_pack_messages",
    "MQTT messages per pilotlab.readings record (ingest.pack)",
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 1000),
)
PRODUCE_LATENCY = Histogram(
    "pilotlab_ingest_produce_seconds",
    "MQTT receive → Kafka confirm",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)


class _PendingAck:
    """Acknowledge one MQTT message once all of its Kafka records are confirmed and, for a
    message refused as ``duplicate``, once the message that first carried those seqs is."""

    __slots__ = (
        "client",
        "dependents",
        "done",
        "failed",
        "forwarded",
        "generation",
        "mid",
        "qos",
        "remaining",
        "started",
        "svc",
    )

    def __init__(
        self, svc: IngestService, client: mqtt.Client, mid: int, qos: int, *, remaining: int, forwarded: int
    ) -> None:
        self.svc, self.client, self.mid, self.qos = svc, client, mid, qos
        self.remaining = remaining
        self.forwarded = forwarded
        self.failed = False
        self.done = False
        self.dependents: list[_PendingAck] | None = None  # made when needed: rarely
        self.started = time.perf_counter()
        # the MQTT connection the message came on: after a reconnect the broker redelivers
        # what was not acknowledged, with packet ids of the new connection (see delivered)
        self.generation = svc.generation

    def wait_for(self, original: object) -> None:
        """Do not acknowledge before ``original`` (another _PendingAck) is confirmed."""
        if not isinstance(original, _PendingAck):
            return
        with self.svc.ack_lock:
            if original.done:
                return
            self.remaining += 1
            if original.dependents is None:
                original.dependents = []
            original.dependents.append(self)

    def delivered(self, err, msg) -> None:  # runs in the producer's poll thread
        if err is not None:  # not confirmed (broker down past message.timeout.ms): produce it again
            self.svc.reproduce(err, msg, self)
            return
        with self.svc.ack_lock:
            self.remaining -= 1
            if self.remaining > 0 or self.failed or self.svc.error is not None:
                return
            self.done = True
            dependents, self.dependents = self.dependents, None
        PRODUCE_LATENCY.observe(time.perf_counter() - self.started)
        FORWARDED.inc(self.forwarded)
        if not self.svc.kafka_marked_ok:
            self.svc.kafka_confirmed()
        if self.generation == self.svc.generation:
            self.client.ack(self.mid, self.qos)
            ACKED.inc()
        # else: received before a reconnect; the broker redelivers it (a duplicate, acked then)
        INFLIGHT.dec()
        self.svc.inflight.release()
        for d in dependents or ():
            d.delivered(None, None)


class _PackAck:
    """The delivery callback of a packed record: confirms each message in it (a failed one is
    produced again whole, as one record)."""

    __slots__ = ("pendings", "svc")

    def __init__(self, svc: IngestService, pendings: list[_PendingAck]) -> None:
        self.svc, self.pendings = svc, pendings

    def delivered(self, err, msg) -> None:  # runs in the producer's poll thread
        if err is not None:
            self.svc.reproduce(err, msg, self)
            return
        for p in self.pendings:
            p.delivered(None, None)


class IngestService:
    def __init__(self, settings: IngestSettings) -> None:
        self.settings = settings
        self.limits = Limits(
            max_payload_bytes=settings.ingest_max_payload_bytes,
            max_batch=settings.ingest_max_batch,
            max_age_ms=settings.ingest_max_age_s * 1000,
            max_future_ms=settings.ingest_max_future_s * 1000,
        )
        self.registry = RegistryFollower(settings.kafka_bootstrap)
        self.producer = Producer(
            {
                "bootstrap.servers": settings.kafka_bootstrap,
                "acks": "all",
                "enable.idempotence": settings.ingest_kafka_idempotence,
                "linger.ms": settings.ingest_kafka_linger_ms,
                "compression.type": "none",
                "client.id": settings.ingest_client_id,
                # a record not confirmed within a minute is reported (and produced again): an
                # outage shows in the log and on /metrics while the MQTT messages stay unacked
                "message.timeout.ms": 60_000,
                "error_cb": self._kafka_error,
            }
        )
        self.endpoint = MqttEndpoint.parse(
            settings.mqtt_url,
            settings.mqtt_username,
            settings.mqtt_password.get_secret_value() if settings.mqtt_password else None,
        )
        self.seqs = SeqMemory(settings.ingest_dedup_per_device, settings.ingest_dedup_devices)
        self.values = ValueMemory(settings.ingest_conflict_instants, settings.ingest_dedup_devices)
        self.packer: Packer[_PendingAck] = Packer(
            settings.ingest_pack_messages, settings.ingest_pack_bytes, settings.ingest_pack_ms / 1000, time.monotonic
        )
        self.pack_lock = threading.Lock()  # packs reach the producer in the order they were started
        self.ack_lock = threading.Lock()
        self.inflight = threading.BoundedSemaphore(settings.ingest_max_inflight)
        self.stopping = threading.Event()
        self.error: str | None = None
        self.generation = 0  # MQTT connections so far (see _PendingAck.generation)
        self.retries: list[tuple[float, str, bytes | None, bytes, _PendingAck]] = []  # (due, topic, key, value, ack)
        self.kafka_errors = ErrorLog(log, "Kafka")
        # False until a delivery marked Kafka confirmed, and again after any error (both in the
        # poll thread): a delivery then updates the gauge, /readyz and the error log once
        self.kafka_marked_ok = False
        self.client = self._mqtt_client()
        # /healthz: the Kafka poll loop beats, paho's network thread runs; /readyz: below
        self.health = Health("ingest", ("mqtt_subscribed", "kafka_reachable"))
        self.health.set("kafka_reachable", True)  # until librdkafka reports every broker down
        self.health.watch("registry_loaded", self.registry.ready.is_set)
        self.health.watch_thread("mqtt-network", lambda: getattr(self.client, "_thread", None))
        self._next_kafka_probe = 0.0
        READY.set_function(self.health.is_ready)

    # lifecycle ---------------------------------------------------------------------------
    def fatal(self, reason: str) -> None:
        """Stop without acknowledging anything further: the broker will redeliver."""
        if self.error is None:
            self.error = reason
            log.error("stopping: %s", reason)
        self.stopping.set()

    def _mqtt_client(self) -> mqtt.Client:
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.settings.ingest_client_id,
            clean_session=False,  # persistent session: the broker queues for us while we are away
            manual_ack=True,
        )
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        self.endpoint.configure(client, self.settings.mqtt_ca_file)
        # back within 2 s of the broker: it queues for our session meanwhile, in memory
        client.reconnect_delay_set(min_delay=1, max_delay=2)
        return client

    def _kafka_error(self, err) -> None:  # librdkafka's error_cb, in the poll thread
        self.kafka_marked_ok = False
        KAFKA_ERRORS.labels(err.name()).inc()
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            KAFKA_CONNECTED.set(0)
            self.health.set("kafka_reachable", False)
        self.kafka_errors.failed(f"{err.name()}: {err.str()}; MQTT messages stay unacknowledged until it confirms")

    def kafka_confirmed(self) -> None:
        """Kafka confirmed a record: connected, reachable, errors over. Called by a delivery
        only while ``kafka_marked_ok`` is False (after an error), not for every message."""
        self.kafka_marked_ok = True
        KAFKA_CONNECTED.set(1)
        self.health.set("kafka_reachable", True)
        if self.kafka_errors.since is not None:
            self.kafka_errors.ok()

    def reproduce(self, err, msg, pending: _PendingAck) -> None:
        """A record Kafka did not confirm: count and log the cause, produce it again after a
        second. Its MQTT message stays unacknowledged meanwhile; nothing is dropped."""
        self.kafka_marked_ok = False
        KAFKA_ERRORS.labels(err.name()).inc()
        self.kafka_errors.failed(
            f"record to {msg.topic()} not confirmed ({err.name()}: {err.str()}); producing it again"
        )
        self.retries.append((time.monotonic() + 1.0, msg.topic(), msg.key(), msg.value(), pending))

    def _on_connect(self, client, _userdata, _flags, reason_code, _props) -> None:
        self.generation += 1
        if reason_code.is_failure:
            MQTT_DISCONNECTS.inc()
            log.error("MQTT connect refused: %s; paho tries again", reason_code)
            return
        group = self.settings.ingest_share_group
        sub = f"$share/{group}/{TELEMETRY_SUBSCRIPTION}" if group else TELEMETRY_SUBSCRIPTION
        client.subscribe(sub, qos=1)
        log.info("subscribed to %s", sub)

    def _on_subscribe(self, _client, _userdata, _mid, reason_codes, _props) -> None:
        if any(rc.is_failure for rc in reason_codes):
            self.fatal(f"telemetry subscription refused: {reason_codes}")
            return
        SUBSCRIBED.set(1)
        self.health.set("mqtt_subscribed", True)

    def _on_disconnect(self, _client, _userdata, _flags, reason_code, _props) -> None:
        self.generation += 1
        if not self.stopping.is_set():
            SUBSCRIBED.set(0)
            self.health.set("mqtt_subscribed", False)
            MQTT_DISCONNECTS.inc()
            log.warning("MQTT disconnected (%s); paho reconnects", reason_code)

    # the hot path -----------------------------------------------------------------------
    def _on_message(self, client: mqtt.Client, _userdata, msg: mqtt.MQTTMessage) -> None:
        if self.stopping.is_set():
            return  # not acknowledged: redelivered to the next session
        MESSAGES.inc()
        now_ms = time.time_ns() // 1_000_000  # = to_ms(utcnow()), without two datetimes per message
        outcome = handle(msg.topic, msg.payload, now_ms, self.registry.registry, self.limits)
        originals = screen_duplicates(outcome, self.seqs, msg.topic, msg.payload)
        if msg.dup and originals:
            # the broker sends again a message of this session (after a reconnect or its own
            # restart): the repeated seqs are our earlier copy, not the device's fault
            REDELIVERED.inc()
            outcome.rejections = [r for r in outcome.rejections if r.reason != Reason.DUPLICATE]
        conflicts = screen_conflicts(outcome, self.values, msg.topic, msg.payload)
        originals.extend(conflicts.tokens)
        if conflicts.repeats:
            REPEATED.inc(conflicts.repeats)
        records: list[tuple[str, bytes, bytes]] = []
        key = (outcome.address.experiment_id if outcome.address else "").encode()
        if outcome.batch is not None:
            records.append((KafkaTopics.READINGS, key, outcome.batch.to_json()))
            READINGS.inc(len(outcome.batch.readings))
        for rej in outcome.rejections:
            REJECTED.labels(str(rej.reason)).inc()
            records.append((KafkaTopics.REJECTIONS, key, rej.to_json()))
        if outcome.rejections and outcome.address is not None:
            feedback = orjson.dumps({"rejections": [r.to_dict() for r in outcome.rejections]})
            client.publish(feedback_topic(outcome.address.experiment_id, outcome.address.device_id), feedback, qos=0)
        while not self.inflight.acquire(timeout=0.5):  # bounded window of unconfirmed messages
            if self.stopping.is_set():
                return
        forwarded = len(outcome.batch.readings) if outcome.batch is not None else 0
        INFLIGHT.inc()
        pending = _PendingAck(self, client, msg.mid, msg.qos, remaining=len(records) + 1, forwarded=forwarded)
        for original in {id(o): o for o in originals}.values():
            pending.wait_for(original)
        remember(outcome, self.seqs, pending, self.values)
        for topic, k, value in records:
            if topic == KafkaTopics.READINGS:
                with self.pack_lock:
                    for pack in self.packer.add(k, value, pending):
                        self._produce_pack(pack)
            else:
                self._produce(topic, k, value, pending)
        pending.delivered(None, None)  # the +1 above: every record and dependency is now counted

    def _produce_pack(self, pack: Pack[_PendingAck]) -> None:
        """One readings record for a pack (under ``pack_lock``)."""
        tickets = pack.tickets
        PACKED.observe(len(tickets))
        ack = tickets[0] if len(tickets) == 1 else _PackAck(self, tickets)
        self._produce(KafkaTopics.READINGS, pack.key, pack.value(), ack)

    def _produce_due_packs(self, *, all_open: bool = False) -> float:
        """Produce the packs due (all of them at shutdown); returns how long the poll thread
        may wait for the next. The poll thread never waits for ``pack_lock``: its holder may
        be waiting for room in the producer's queue, which only the poll thread's ``poll``
        makes (a full queue at that moment: the packs go on its next round)."""
        if not self.pack_lock.acquire(blocking=all_open):
            return 0.005
        try:
            for pack in self.packer.drain() if all_open else self.packer.due():
                self._produce_pack(pack)
            # with no pack open, wake within one pack wait anyway: a pack the paho thread opens
            # meanwhile must not sit out a whole 100 ms poll (it did: p50 publish → stored
            # 281 ms against 200 without packing at 10,000 dp/s, whatever PILOTLAB_INGEST_PACK_MS)
            return self.packer.wait_s(max(0.001, min(0.1, self.packer.max_wait_s)))
        finally:
            self.pack_lock.release()

    def _produce(self, topic: str, key: bytes, value: bytes, pending: _PendingAck | _PackAck) -> None:
        while True:
            try:
                self.producer.produce(topic, value=value, key=key, on_delivery=pending.delivered)
                return
            except BufferError:  # local queue full: wait for confirmations (back-pressure)
                time.sleep(0.005)

    def _poll_producer(self) -> None:
        wait = 0.1
        while not self.stopping.is_set():
            self.health.beat()
            self._probe_kafka()
            self.producer.poll(wait)
            wait = self._produce_due_packs()
            if self.retries and self.retries[0][0] <= time.monotonic():
                due, self.retries = self.retries, []
                for _due, topic, key, value, pending in due:
                    REPRODUCED.inc()
                    self._produce(topic, key, value, pending)

    def _probe_kafka(self) -> None:
        """After every broker was reported down, ask for metadata every 5 s until one answers:
        /readyz recovers without traffic (a confirmed record also clears it)."""
        if self.health.condition("kafka_reachable") or time.monotonic() < self._next_kafka_probe:
            return
        self._next_kafka_probe = time.monotonic() + 5.0
        try:
            self.producer.list_topics(timeout=2)
        except KafkaException:
            return
        self.health.set("kafka_reachable", True)

    # run --------------------------------------------------------------------------------
    def run(self) -> int:
        if self.settings.ingest_metrics_port:  # /metrics, /healthz, /readyz (pilotlab.health)
            serve(self.settings.ingest_metrics_port, self.health, setting="PILOTLAB_INGEST_METRICS_PORT")
        self.registry.start()
        self.health.beat()
        # Kafka down at start: wait for it, saying so (alive, not ready); a SIGTERM ends the wait
        if not self.registry.wait_ready(self.stopping, beat=self.health.beat):
            return 0  # the follower is a daemon thread, maybe inside a 10 s metadata call
        log.info("registry loaded: %d experiments", len(self.registry.registry.experiments))
        # what start-up made (modules, clients, the registry) lives as long as the process:
        # move it out of the cycle collector's view, so the full collections that the
        # remembered hand-offs trigger do not walk it again and again
        gc.freeze()
        poller = threading.Thread(target=self._poll_producer, name="kafka-poll", daemon=True)
        self.health.watch_thread("kafka-poll", lambda: poller)
        poller.start()
        self.client.max_inflight_messages_set(self.settings.ingest_max_inflight)
        # async: a broker that is down at start is retried by paho's loop, not an exit
        self.client.connect_async(self.endpoint.host, self.endpoint.port, keepalive=30)
        self.client.loop_start()
        log.info(
            "ingest running: %s:%d (as %s) → %s",
            self.endpoint.host,
            self.endpoint.port,
            self.endpoint.username or "anonymous",
            self.settings.kafka_bootstrap,
        )
        self.stopping.wait()
        # drain: no new work (on_message returns early), confirm what is in flight, then ack
        time.sleep(0.05)  # a message paho is handing over right now reaches its pack
        self._produce_due_packs(all_open=True)
        remaining = self.producer.flush(30)
        time.sleep(0.2)  # let paho's network thread send the last PUBACKs
        self.client.disconnect()
        self.client.loop_stop()
        self.registry.stop()
        if remaining:
            log.error("%d records unconfirmed at shutdown; their MQTT messages will be redelivered", remaining)
        log.info("ingest stopped")
        return 1 if self.error else 0


def main(settings: IngestSettings) -> int:
    svc = IngestService(settings)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: svc.stopping.set())
    return svc.run()
