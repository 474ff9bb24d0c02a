"""The alerts service (``pilotlab run alerts``): Kafka → the pure rules engine
(``streams.alerts``) → the ``alerts`` table → a background delivery queue.

Per consumed batch: decode readings (``pilotlab.readings``), refusals (``pilotlab.rejections``)
and KPI windows (``pilotlab.kpis``) into each experiment's events → ``evaluate`` with the
experiment's rules (its own and the lab's defaults) → in ONE database transaction: the new
transitions (idempotent on (experiment, rule, subject, fired_at)), their deliveries, the
engine states of the experiments touched and the next offset of every partition read → then
the Kafka offsets (for lag and tools; the database's are the ones the service resumes from) →
wake the dispatcher. Nothing in the loop waits for a receiver: deliveries are rows the
dispatcher's threads send (``streams.delivery``).

One instance is active at a time (a PostgreSQL advisory lock; another one waits as a standby):
the engine needs all of an experiment's events, and ingest (librdkafka) and the streams worker
(Faust) partition the same experiment id differently, so the service reads every partition of
its topics itself (``assign``, no group rebalancing). Device liveness is computed from the
readings rather than read from ``pilotlab.device-status``: judging from one topic keeps the
transitions independent of how two topics interleave, and the default threshold gives the
same transitions as the worker's (``tests/unit/test_alerts_engine.py``).

Crash-only: a database or decoding surprise the loop cannot ride out ends the process with an
error, and ``pilotlab run alerts`` (the supervisor) starts it again; it resumes from the
stored states and offsets, so nothing fires twice and nothing is skipped.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Mapping

import orjson
import psycopg
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from psycopg_pool import ConnectionPool

from pilotlab.alert_config import AlertDefaults, load_alert_defaults, rules_for, targets_for
from pilotlab.contracts import KafkaTopics, ReadingBatch, Rejection, decode_kpis
from pilotlab.errorlog import ErrorLog
from pilotlab.manifest import Experiment, Webhook
from pilotlab.registry import RegistryFollower
from pilotlab.settings import AlertsSettings
from streams import alert_store as store
from streams import alerts as engine
from streams.delivery import Dispatcher, MqttFeedback, Policy, SmtpConfig, plan

log = logging.getLogger("pilotlab.alerts")

TOPICS = (KafkaTopics.READINGS, KafkaTopics.REJECTIONS, KafkaTopics.KPIS)
_LOCK_ID = 0x616C6572  # "aler": one active alerts service per database
UNDECODABLE = (orjson.JSONDecodeError, ValueError, KeyError, TypeError)


class AlertService:
    def __init__(self, settings: AlertsSettings, env: Mapping[str, str]) -> None:
        self.settings = settings
        self.env = env
        self.stopping = threading.Event()
        self.registry = RegistryFollower(settings.kafka_bootstrap)
        self.defaults: AlertDefaults = load_alert_defaults(settings.alerts_defaults)
        self.smtp = SmtpConfig.parse(settings.smtp_url.get_secret_value()) if settings.smtp_url else None
        self.mqtt = None
        if settings.mqtt_url:
            self.mqtt = MqttFeedback(
                settings.mqtt_url,
                settings.mqtt_username,
                settings.mqtt_password.get_secret_value() if settings.mqtt_password else None,
                settings.mqtt_ca_file,
                settings.alerts_mqtt_client_id,
            )
        self.states: dict[str, dict] = {}
        self.warned_no_smtp: set[str] = set()
        self.totals: dict[str, int] = defaultdict(int)

    # --- configuration in force -------------------------------------------------------------

    def webhook_of(self, experiment_id: str, target: str) -> Webhook | None:
        if target.startswith("lab:"):
            return next((h for h in self.defaults.notify.webhooks if f"lab:{h.name}" == target), None)
        exp = self.registry.registry.experiments.get(experiment_id)
        return None if exp is None else targets_for(exp, self.defaults).webhook(target)

    def experiment(self, experiment_id: str) -> Experiment | None:
        """The experiment from the registry; a new one may reach ingest before us: wait a little."""
        deadline = time.monotonic() + 30
        while (exp := self.registry.registry.experiments.get(experiment_id)) is None:
            if time.monotonic() > deadline or self.stopping.is_set():
                log.error("experiment %r is not in the registry: its events are skipped", experiment_id)
                return None
            time.sleep(0.5)
        return exp

    # --- start-up ---------------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection:
        delay = 0.5
        while True:
            try:
                return psycopg.connect(self.settings.database_url, connect_timeout=5, autocommit=True)
            except psycopg.OperationalError as exc:
                if self.stopping.is_set():
                    raise
                log.warning("database unreachable (%s); retrying in %.1f s", str(exc).strip()[:120], delay)
                time.sleep(delay)
                delay = min(delay * 2, 10)

    def _lead(self, conn: psycopg.Connection) -> bool:
        """Become the active instance (the advisory lock lives as long as this connection)."""
        waited = False
        while not self.stopping.is_set():
            if conn.execute("SELECT pg_try_advisory_lock(%s)", (_LOCK_ID,)).fetchone()[0]:
                if waited:
                    log.info("the other alerts service is gone: this one is active now")
                return True
            if not waited:
                log.warning("another alerts service is active on this database; standing by")
                waited = True
            self.stopping.wait(2.0)
        return False

    def _assign(self, consumer: Consumer, offsets: dict[tuple[str, int], int]) -> None:
        parts = []
        for topic in TOPICS:
            while True:
                meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
                if meta is not None and meta.error is None and meta.partitions:
                    break
                log.warning("topic %s not there yet (%s); waiting", topic, meta.error if meta else "missing")
                if self.stopping.wait(2.0):
                    return
            for p in sorted(meta.partitions):
                parts.append(TopicPartition(topic, p, offsets.get((topic, p), OFFSET_BEGINNING)))
        consumer.assign(parts)
        resumed = sum(1 for tp in parts if tp.offset != OFFSET_BEGINNING)
        log.info("reading %d partitions of %s (%d resumed from the database)", len(parts), ", ".join(TOPICS), resumed)

    # --- one batch --------------------------------------------------------------------------

    def decode(self, msgs) -> tuple[dict[str, list], dict[tuple[str, int], int]]:
        events: dict[str, list] = defaultdict(list)
        offsets: dict[tuple[str, int], int] = {}
        owners = self.registry.registry.device_owner
        for msg in msgs:
            topic, value = msg.topic(), msg.value() or b""
            offsets[(topic, msg.partition())] = msg.offset() + 1
            try:
                if topic == KafkaTopics.READINGS:
                    for batch in ReadingBatch.all_from_json(value):
                        events[batch.experiment_id].append(engine.from_batch(batch))
                elif topic == KafkaTopics.REJECTIONS:
                    rej = Rejection.from_json(value)
                    refused = engine.from_rejection(rej)
                    # only refusals of a registered device of that experiment (not spoofs, typos)
                    if refused is not None and owners.get(refused.device_id) == rej.experiment_id:
                        events[rej.experiment_id].append(refused)
                elif topic == KafkaTopics.KPIS:
                    for v in decode_kpis(value):
                        events[v.experiment_id].append(engine.from_kpi(v))
            except UNDECODABLE as exc:
                log.warning("skipping an undecodable record %s[%d]@%d: %s", topic, msg.partition(), msg.offset(), exc)
        return events, offsets

    def handle(self, conn: psycopg.Connection, events: dict[str, list], offsets: dict) -> None:
        transitions: list[engine.Transition] = []
        touched: dict[str, dict] = {}
        experiments: dict[str, Experiment] = {}
        for exp_id in sorted(events):
            exp = self.experiment(exp_id)
            if exp is None:
                continue
            rules = rules_for(exp, self.defaults)
            if not rules and exp_id not in self.states:
                continue
            experiments[exp_id] = exp
            out, touched[exp_id] = engine.evaluate(self.states.get(exp_id), events[exp_id], exp, rules)
            transitions.extend(out)

        def deliveries_of(t: engine.Transition):
            exp = experiments[t.experiment_id]
            targets = targets_for(exp, self.defaults)
            if targets.email and self.smtp is None and exp.id not in self.warned_no_smtp:
                self.warned_no_smtp.add(exp.id)
                log.warning("%s wants alerts by e-mail, but PILOTLAB_SMTP_URL is not set: none is sent", exp.id)
            return plan(t, exp, targets, email=self.smtp is not None, mqtt=self.mqtt is not None)

        new, queued = store.store_batch(conn, transitions, deliveries_of, touched, offsets)
        self.states.update(touched)
        for t in new:
            log.info("alert %s: %s/%s %s — %s", t.status, t.experiment_id, t.rule, t.subject, t.summary)
        self.totals["transitions"] += len(new)
        self.totals["deliveries"] += queued

    # --- run ------------------------------------------------------------------------------

    def run(self) -> int:
        s = self.settings
        self.registry.start()
        if not self.registry.wait_ready(self.stopping):  # Kafka down at start; a SIGTERM ends the wait
            return 0  # the follower is a daemon thread, maybe inside a 10 s metadata call
        conn = self._connect()
        if not self._lead(conn):
            conn.close()
            return 0
        self.states = store.load_states(conn)
        offsets = store.load_offsets(conn)
        consumer = Consumer(
            {
                "bootstrap.servers": s.kafka_bootstrap,
                "group.id": s.alerts_group,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "fetch.wait.max.ms": s.kafka_fetch_wait_ms,
            }
        )
        pool = ConnectionPool(s.database_url, min_size=1, max_size=4, kwargs={"autocommit": True}, open=True)
        policy = Policy(
            s.alerts_webhook_timeout_s,
            s.alerts_smtp_timeout_s,
            s.alerts_retry_base_s,
            s.alerts_retry_cap_s,
            s.alerts_max_attempts,
            s.alerts_delivery_poll_ms / 1000,
        )
        dispatcher = Dispatcher(
            store.DeliveryStore(pool),
            policy,
            self.webhook_of,
            self.env,
            smtp=self.smtp,
            smtp_from=s.smtp_from,
            mqtt=self.mqtt,
        )
        if self.mqtt is not None:
            self.mqtt.start()
        dispatcher.start()
        errors = ErrorLog(log, "Kafka consumer")
        try:
            self._assign(consumer, offsets)
            log.info(
                "alerts service running: %d experiments with state, %d lab-wide rules, e-mail %s, MQTT %s",
                len(self.states),
                len(self.defaults.alerts),
                "on" if self.smtp else "off",
                "on" if self.mqtt else "off",
            )
            while not self.stopping.is_set():
                msgs = consumer.consume(s.alerts_batch_size, s.alerts_batch_wait_ms / 1000)
                good = []
                for msg in msgs:
                    err = msg.error()
                    if err is not None:
                        if err.code() != KafkaError._PARTITION_EOF:
                            errors.failed(str(err))
                        continue
                    good.append(msg)
                if not good:
                    continue
                errors.ok()
                events, offsets = self.decode(good)
                self.handle(conn, events, offsets)
                try:
                    consumer.commit(
                        offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()], asynchronous=True
                    )
                except KafkaException as exc:  # the database holds the positions that count
                    log.debug("offset commit to Kafka failed: %s", exc)
                dispatcher.wake.set()
        finally:
            dispatcher.stop()
            if self.mqtt is not None:
                self.mqtt.stop()
            consumer.close()
            pool.close()
            conn.close()
            self.registry.stop()
            log.info("alerts service stopped: %s; deliveries sent %d", dict(self.totals), dispatcher.sent)
        return 0


def main(settings: AlertsSettings, env: Mapping[str, str]) -> int:
    svc = AlertService(settings, env)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: svc.stopping.set())
    return svc.run()
