"""The ingest service: MQTT (QoS 1, persistent shared subscription) → Kafka.

A message is acknowledged to the MQTT broker only after Kafka has confirmed every record
it produced (acks=all): if ingest dies first, the broker redelivers it. Redeliveries are
harmless downstream (natural keys). Rejections go to the dead-letter topic and to the
device's feedback topic, so the startup sees why, live.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

import orjson
import paho.mqtt.client as mqtt
from confluent_kafka import KafkaException, Producer
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from ingest.decode import Limits
from ingest.dedup import SeqMemory, ValueMemory
from ingest.pipeline import handle, remember, screen_conflicts, screen_duplicates
from pilotlab.contracts import TELEMETRY_SUBSCRIPTION, KafkaTopics, feedback_topic, to_ms, utcnow
from pilotlab.credentials import MqttEndpoint
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
PRODUCE_LATENCY = Histogram(
    "pilotlab_ingest_produce_seconds",
    "MQTT receive → Kafka confirm",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)


class _PendingAck:
    """Acknowledge one MQTT message once all of its Kafka records are confirmed and, for a
    message refused as ``duplicate``, once the message that first carried those seqs is."""

    __slots__ = ("client", "dependents", "done", "failed", "forwarded", "mid", "qos", "remaining", "started", "svc")

    def __init__(
        self, svc: IngestService, client: mqtt.Client, mid: int, qos: int, *, remaining: int, forwarded: int
    ) -> None:
        self.svc, self.client, self.mid, self.qos = svc, client, mid, qos
        self.remaining = remaining
        self.forwarded = forwarded
        self.failed = False
        self.done = False
        self.dependents: list[_PendingAck] = []
        self.started = time.perf_counter()

    def wait_for(self, original: object) -> None:
        """Do not acknowledge before ``original`` (another _PendingAck) is confirmed."""
        if not isinstance(original, _PendingAck):
            return
        with self.svc.ack_lock:
            if original.done:
                return
            self.remaining += 1
            original.dependents.append(self)

    def delivered(self, err, _msg) -> None:  # runs in the producer's poll thread
        if err is not None:
            self.failed = True
            self.svc.fatal(f"Kafka did not confirm a record: {err}")
            return
        with self.svc.ack_lock:
            self.remaining -= 1
            if self.remaining > 0 or self.failed or self.svc.error is not None:
                return
            self.done = True
            dependents, self.dependents = self.dependents, []
        PRODUCE_LATENCY.observe(time.perf_counter() - self.started)
        FORWARDED.inc(self.forwarded)
        self.client.ack(self.mid, self.qos)
        ACKED.inc()
        INFLIGHT.dec()
        self.svc.inflight.release()
        for d in dependents:
            d.delivered(None, None)


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
                "linger.ms": 5,
                "compression.type": "none",
                "client.id": settings.ingest_client_id,
            }
        )
        self.endpoint = MqttEndpoint.parse(
            settings.mqtt_url,
            settings.mqtt_username,
            settings.mqtt_password.get_secret_value() if settings.mqtt_password else None,
        )
        self.seqs = SeqMemory(settings.ingest_dedup_per_device, settings.ingest_dedup_devices)
        self.values = ValueMemory(settings.ingest_conflict_instants, settings.ingest_dedup_devices)
        self.ack_lock = threading.Lock()
        self.inflight = threading.BoundedSemaphore(settings.ingest_max_inflight)
        self.stopping = threading.Event()
        self.error: str | None = None
        self.client = self._mqtt_client()

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
        return client

    def _on_connect(self, client, _userdata, _flags, reason_code, _props) -> None:
        if reason_code.is_failure:
            self.fatal(f"MQTT connect refused: {reason_code}")
            return
        sub = f"$share/{self.settings.ingest_share_group}/{TELEMETRY_SUBSCRIPTION}"
        client.subscribe(sub, qos=1)
        log.info("subscribed to %s", sub)

    def _on_subscribe(self, _client, _userdata, _mid, reason_codes, _props) -> None:
        if any(rc.is_failure for rc in reason_codes):
            self.fatal(f"telemetry subscription refused: {reason_codes}")
            return
        SUBSCRIBED.set(1)

    def _on_disconnect(self, _client, _userdata, _flags, reason_code, _props) -> None:
        if not self.stopping.is_set():
            SUBSCRIBED.set(0)
            log.warning("MQTT disconnected (%s); paho reconnects", reason_code)

    # the hot path -----------------------------------------------------------------------
    def _on_message(self, client: mqtt.Client, _userdata, msg: mqtt.MQTTMessage) -> None:
        if self.stopping.is_set():
            return  # not acknowledged: redelivered to the next session
        MESSAGES.inc()
        now_ms = to_ms(utcnow())
        outcome = handle(msg.topic, msg.payload, now_ms, self.registry.registry, self.limits)
        originals = screen_duplicates(outcome, self.seqs, msg.topic, msg.payload)
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
            client.publish(
                feedback_topic(outcome.address.experiment_id, outcome.address.device_id), feedback, qos=0
            )
        while not self.inflight.acquire(timeout=0.5):  # bounded window of unconfirmed messages
            if self.stopping.is_set():
                return
        forwarded = len(outcome.batch.readings) if outcome.batch is not None else 0
        INFLIGHT.inc()
        pending = _PendingAck(
            self, client, msg.mid, msg.qos, remaining=len(records) + 1, forwarded=forwarded
        )
        for original in {id(o): o for o in originals}.values():
            pending.wait_for(original)
        remember(outcome, self.seqs, pending, self.values)
        for topic, k, value in records:
            self._produce(topic, k, value, pending)
        pending.delivered(None, None)  # the +1 above: every record and dependency is now counted

    def _produce(self, topic: str, key: bytes, value: bytes, pending: _PendingAck) -> None:
        while True:
            try:
                self.producer.produce(topic, value=value, key=key, on_delivery=pending.delivered)
                return
            except BufferError:  # local queue full: wait for confirmations (back-pressure)
                time.sleep(0.005)

    def _poll_producer(self) -> None:
        while not self.stopping.is_set():
            self.producer.poll(0.1)

    # run --------------------------------------------------------------------------------
    def run(self) -> int:
        if self.settings.ingest_metrics_port:
            start_http_server(self.settings.ingest_metrics_port, addr="0.0.0.0")
        self.registry.start()
        if not self.registry.ready.wait(30):
            raise KafkaException(f"could not read the registry topic at {self.settings.kafka_bootstrap}")
        log.info("registry loaded: %d experiments", len(self.registry.registry.experiments))
        poller = threading.Thread(target=self._poll_producer, name="kafka-poll", daemon=True)
        poller.start()
        self.client.max_inflight_messages_set(self.settings.ingest_max_inflight)
        self.client.connect(self.endpoint.host, self.endpoint.port, keepalive=30)
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
        remaining = self.producer.flush(30)
        time.sleep(0.2)  # let paho's network thread send the last PUBACKs
        self.client.disconnect()
        self.client.loop_stop()
        self.registry.stop()
        if remaining:
            log.error(
                "%d records unconfirmed at shutdown; their MQTT messages will be redelivered", remaining
            )
        log.info("ingest stopped")
        return 1 if self.error else 0


def main(settings: IngestSettings) -> int:
    svc = IngestService(settings)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: svc.stopping.set())
    return svc.run()
