"""Alerts end to end on the real stack: MQTT → ingest → Kafka → ``pilotlab run alerts`` →
PostgreSQL → webhook, MQTT feedback topic, SMTP.

A device goes silent while the others keep reporting: the offline alert fires and reaches a
local webhook receiver (signed with HMAC-SHA256), the device's feedback topic and a local
SMTP server (aiosmtpd; the experiment's address and the lab-wide default one). The alerts
service is killed (-9) and started again while the device is still silent: the alert is not
fired again. The device reports again: the alert resolves, delivered the same three ways, and
the ``alerts`` table holds the episode. Beside the good receiver, one answers 500 (retried
with exponential back-off, then given up) and one hangs (timed out and retried): neither holds
up the good receiver nor the judging.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.server
import itertools
import threading
import time
from datetime import timedelta
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from control.services import Services
from control.stack import free_port
from pilotlab import registry
from pilotlab.contracts import telemetry_topic, to_ms, utcnow
from pilotlab.credentials import MqttEndpoint
from pilotlab.kafka_admin import lag_or_reason
from pilotlab.manifest import Experiment
from storage.queries import alert_deliveries, alert_history
from streams.alerting import TOPICS as ALERT_TOPICS
from streams.delivery import backoff_s

aiosmtpd_controller = pytest.importorskip("aiosmtpd.controller")

pytestmark = pytest.mark.integration

EXP = "alerts-it"
DEVICES = ("al-d1", "al-d2", "al-d3")
SILENT = "al-d2"
SECRET = "test-webhook-secret-0123456789"
RETRY_BASE, RETRY_CAP, MAX_ATTEMPTS = 0.3, 1.2, 4
LOGS: list[Path] = []  # the services' log directory, shown when a wait times out


def experiment(hooks: dict[str, int]) -> Experiment:
    now = utcnow().replace(microsecond=0)
    return Experiment.model_validate(
        {
            "id": EXP,
            "title": "Alerts integration test",
            "startup": "TestCo",
            "district": "Centro",
            "location": {"lat": 45.07, "lon": 7.68},
            "periods": {
                "baseline": {"start": (now - timedelta(hours=1)).isoformat(), "end": now.isoformat()},
                "intervention": {"start": now.isoformat(), "end": (now + timedelta(hours=1)).isoformat()},
            },
            "devices": [{"id": d, "kind": "air_quality", "interval": "1s"} for d in DEVICES],
            "kpis": [{"name": "no2_count", "metric": "no2", "kind": "count", "window": "1m"}],
            "alerts": [
                {"name": "offline", "kind": "device_offline", "after": "3s", "grace": "1s", "severity": "critical"}
            ],
            "notify": {
                "webhooks": [
                    {"name": name, "url": f"http://127.0.0.1:{port}/hook", "secret_env": "PILOTLAB_TEST_HOOK_SECRET"}
                    for name, port in hooks.items()
                ],
                "email": ["startup@example.test"],
            },
        }
    )


class Receiver(http.server.ThreadingHTTPServer):
    """A webhook receiver on a free loopback port: records every POST (arrival time, headers,
    body); answers ``code`` after ``hang`` seconds."""

    daemon_threads = True

    def __init__(self, code: int = 200, hang: float = 0.0) -> None:
        self.code, self.hang, self.posts = code, hang, []
        self.release = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.posts.append((time.monotonic(), dict(self.headers), body))
                if outer.hang:
                    outer.release.wait(outer.hang)
                with contextlib.suppress(OSError):
                    self.send_response(outer.code)
                    self.end_headers()

            def log_message(self, *_args) -> None:
                pass

        super().__init__(("127.0.0.1", free_port()), Handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def docs(self) -> list[dict]:
        return [orjson.loads(body) for _, _, body in self.posts]

    def close(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()


class Inbox:
    """aiosmtpd handler: keeps every message it is handed."""

    def __init__(self) -> None:
        self.messages: list[tuple[list[str], str]] = []

    async def handle_DATA(self, _server, _session, envelope):
        self.messages.append((list(envelope.rcpt_tos), envelope.content.decode("utf-8", "replace")))
        return "250 OK"


class Devices:
    """Publishes a reading of each active device every 0.25 s, stamped now."""

    def __init__(self, mqtt_url: str) -> None:
        ep = MqttEndpoint.parse(mqtt_url)  # the lab's account may write every telemetry topic
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="alerts-it-devices")
        ep.configure(self.client)
        self.client.connect(ep.host, ep.port)
        self.client.loop_start()
        self.active = set(DEVICES)
        self.stop = threading.Event()
        self.seq = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.25):
            self.seq += 1
            ts = to_ms(utcnow())
            for d in sorted(self.active):
                payload = orjson.dumps({"seq": self.seq, "ts": ts, "metrics": {"no2": 20.0 + self.seq % 5}})
                self.client.publish(telemetry_topic(EXP, d), payload, qos=1)

    def close(self) -> None:
        if self.stop.is_set():
            return
        self.stop.set()
        self.thread.join(5)
        self.client.disconnect()
        self.client.loop_stop()


class Feedback:
    """Subscribes to every feedback topic of the experiment and keeps the alerts."""

    def __init__(self, mqtt_url: str) -> None:
        ep = MqttEndpoint.parse(mqtt_url)
        self.alerts: list[tuple[str, dict]] = []
        self.subscribed = threading.Event()
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="alerts-it-feedback")
        ep.configure(self.client)
        self.client.on_connect = lambda c, *_: c.subscribe(f"pilots/{EXP}/+/feedback", qos=1)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = self._message
        self.client.connect(ep.host, ep.port)
        self.client.loop_start()
        assert self.subscribed.wait(10)

    def _message(self, _client, _userdata, msg) -> None:
        doc = orjson.loads(msg.payload)
        self.alerts += [(msg.topic, a) for a in doc.get("alerts", [])]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def wait_for(what: str, check, timeout: float = 30.0, services: Services | None = None):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if services is not None:
            services.check_alive()
        if time.monotonic() > deadline:
            tail = ""
            if LOGS and (LOGS[0] / "alerts.log").exists():
                tail = "\n".join((LOGS[0] / "alerts.log").read_text().splitlines()[-30:])
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")
        time.sleep(0.1)


def of(docs: list[dict], status: str) -> list[dict]:
    return [d for d in docs if d["subject"] == SILENT and d["status"] == status]


def test_an_offline_device_alerts_by_webhook_mqtt_and_email_and_resolves(stack_state, stack, tmp_path: Path):
    good, broken, hanging = Receiver(200), Receiver(500), Receiver(200, hang=30)
    inbox = Inbox()
    smtp = aiosmtpd_controller.Controller(inbox, hostname="127.0.0.1", port=free_port())
    smtp.start()
    defaults = tmp_path / "alerts-defaults.yaml"
    defaults.write_text(
        "alerts:\n"
        "  - {name: firmware-broken, kind: rejection_rate_above, threshold: 0.5, window: 1m, min_count: 20}\n"
        "notify:\n"
        "  email: [lab-ops@example.test]\n"
    )
    exp = experiment({"good": good.port, "broken": broken.port, "hanging": hanging.port})
    registry.publish(stack_state.kafka_bootstrap, [exp])
    env = {
        "PILOTLAB_TEST_HOOK_SECRET": SECRET,
        "PILOTLAB_ALERTS_DEFAULTS": str(defaults),
        "PILOTLAB_SMTP_URL": f"smtp://127.0.0.1:{smtp.port}",
        "PILOTLAB_SMTP_FROM": "alerts@pilotlab.test",
        "PILOTLAB_ALERTS_RETRY_BASE_S": str(RETRY_BASE),
        "PILOTLAB_ALERTS_RETRY_CAP_S": str(RETRY_CAP),
        "PILOTLAB_ALERTS_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
        "PILOTLAB_ALERTS_WEBHOOK_TIMEOUT_S": "1.5",
        "PILOTLAB_ALERTS_DELIVERY_POLL_MS": "100",
        "PILOTLAB_ALERTS_BATCH_WAIT_MS": "100",
    }
    feedback = Feedback(stack_state.mqtt_url)
    devices = None
    try:
        LOGS[:] = [stack.logs / "services-alerts"]
        with Services(stack_state, LOGS[0], env).start("ingest", "alerts") as services:
            services.wait_ingest_ready()
            devices = Devices(stack_state.mqtt_url)
            time.sleep(2.0)

            # --- the device goes silent: firing, three ways ------------------------------------
            devices.active.discard(SILENT)
            silent_since = time.monotonic()
            fired = wait_for("the firing at the good webhook", lambda: of(good.docs(), "firing"), 30, services)
            assert len(fired) == 1
            alert = fired[0]
            assert alert["rule"] == "offline" and alert["kind"] == "device_offline"
            assert alert["severity"] == "critical" and alert["device_id"] == SILENT
            assert alert["experiment_id"] == EXP and alert["resolved_at"] is None
            assert "silent for 3 s" in alert["summary"]
            # correctly signed: HMAC-SHA256 of the exact body with the secret the manifest names
            _, headers, body = next(p for p in good.posts if orjson.loads(body_of(p))["status"] == "firing")
            assert headers["X-Pilotlab-Signature"] == signature(SECRET.encode(), body)
            assert headers["X-Pilotlab-Event"] == "alert.firing"
            assert headers["X-Pilotlab-Delivery"] == alert["delivery_id"]
            assert headers["Content-Type"] == "application/json"
            # the two bad receivers did not hold it up: it came within seconds of the silence
            assert time.monotonic() - silent_since < 15

            topic = f"pilots/{EXP}/{SILENT}/feedback"
            on_mqtt = wait_for(
                "the firing on the feedback topic",
                lambda: [a for t, a in feedback.alerts if t == topic and a["status"] == "firing"],
            )
            assert on_mqtt[0]["alert_id"] == alert["alert_id"]
            mails = wait_for("two firing mails", lambda: len(firing_mails(inbox)) >= 2 and firing_mails(inbox))
            assert sorted(r for rcpts, _ in mails for r in rcpts) == ["lab-ops@example.test", "startup@example.test"]
            assert all(alert["alert_id"] in text and SILENT in text for _, text in mails)

            with psycopg.connect(stack_state.database_url) as conn:
                wait_for("the deliveries of the firing", lambda: delivered(conn, alert["alert_id"], "firing") >= 4)

            # --- kill -9 and restart while it is still silent: not fired again -----------------
            services.kill("alerts")
            restarted = utcnow()
            services.start("alerts")
            with psycopg.connect(stack_state.database_url, autocommit=True) as conn:
                wait_for(
                    "the restarted service to judge new readings",
                    lambda: conn.execute(
                        "SELECT updated_at > %s + interval '3 seconds' FROM alert_state WHERE experiment_id = %s",
                        (restarted, EXP),
                    ).fetchone()[0],
                    45,
                    services,
                )
                episodes = conn.execute(
                    "SELECT status, count(*) FROM alerts WHERE experiment_id = %s AND subject = %s GROUP BY status",
                    (EXP, SILENT),
                ).fetchall()
                assert episodes == [("firing", 1)]
            assert len(of(good.docs(), "firing")) == 1
            assert len({d["alert_id"] for d in good.docs()}) == 1

            # --- it reports again: resolved, three ways ------------------------------------------
            devices.active.add(SILENT)
            resolved = wait_for("the resolution at the good webhook", lambda: of(good.docs(), "resolved"), 30, services)
            assert len(resolved) == 1 and resolved[0]["alert_id"] == alert["alert_id"]
            assert resolved[0]["resolved_at"] is not None and resolved[0]["resolved_at"] > alert["fired_at"]
            _, headers, body = good.posts[-1]
            assert headers["X-Pilotlab-Event"] == "alert.resolved"
            assert headers["X-Pilotlab-Signature"] == signature(SECRET.encode(), body)
            wait_for(
                "the resolution on the feedback topic",
                lambda: [a for t, a in feedback.alerts if t == topic and a["status"] == "resolved"],
            )
            wait_for("two resolution mails", lambda: len(resolved_mails(inbox)) >= 2)

            # --- the 500 receiver: retried with back-off, then given up; nothing else waited -----
            with psycopg.connect(stack_state.database_url) as conn:
                rows = wait_for(
                    "the 500 receiver's resolution delivery to be given up",
                    lambda: [
                        d
                        for d in alert_deliveries(conn, alert["alert_id"])
                        if d.target == "experiment:broken" and d.event == "resolved" and d.status == "failed"
                    ],
                )
                assert rows[0].attempts == MAX_ATTEMPTS and len(rows[0].history) == MAX_ATTEMPTS
                assert rows[0].last_error.startswith("HTTP 500")
                arrivals = [t for (t, _, b) in broken.posts if orjson.loads(b)["status"] == "resolved"]
                gaps = [b - a for a, b in itertools.pairwise(arrivals)]
                assert len(arrivals) == MAX_ATTEMPTS
                for n, gap in enumerate(gaps, start=1):  # never sooner than the back-off
                    assert gap >= backoff_s(n, RETRY_BASE, RETRY_CAP) - 0.05, gaps
                assert gaps[-1] > gaps[0] * 1.5, gaps
                # the hanging one times out and is tried again; the others were delivered meanwhile
                hung = [d for d in alert_deliveries(conn, alert["alert_id"]) if d.target == "experiment:hanging"]
                assert hung and all(d.status != "delivered" for d in hung)
                assert any("timed out" in (d.last_error or "") for d in hung)
                done = {
                    (d.channel, d.target, d.event)
                    for d in alert_deliveries(conn, alert["alert_id"])
                    if d.status == "delivered"
                }
                assert done == {
                    (c, t, e)
                    for e in ("firing", "resolved")
                    for c, t in (
                        ("webhook", "experiment:good"),
                        ("mqtt", topic),
                        ("email", "startup@example.test"),
                        ("email", "lab-ops@example.test"),
                    )
                }

                # --- the history ---------------------------------------------------------------
                history = [h for h in alert_history(conn, EXP) if h.subject == SILENT]
                assert len(history) == 1
                h = history[0]
                assert (h.alert_id, h.status, h.rule, h.severity) == (
                    alert["alert_id"],
                    "resolved",
                    "offline",
                    "critical",
                )
                assert h.resolved_at > h.fired_at
                assert h.delivered == 8 and h.failed >= 1
                others = [x for x in alert_history(conn, EXP) if x.subject != SILENT]
                assert others == [], "only the silent device alerted"

            # the consumer group's lag reaches 0 (what a demo or an operator waits for)
            devices.close()
            wait_for(
                "the alerts service's lag to reach 0",
                lambda: lag_or_reason(stack_state.kafka_bootstrap, "pilotlab-alerts", ALERT_TOPICS) == 0,
                30,
                services,
            )
    finally:
        if devices is not None:
            devices.close()
        feedback.close()
        smtp.stop()
        for r in (good, broken, hanging):
            r.close()


def signature(secret: bytes, body: bytes) -> str:
    """What a receiver computes (docs/alerts.md), independently of pilotlab's code."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def body_of(post) -> bytes:
    return post[2]


def firing_mails(inbox: Inbox) -> list:
    return [m for m in inbox.messages if "FIRING" in m[1]]


def resolved_mails(inbox: Inbox) -> list:
    return [m for m in inbox.messages if "RESOLVED" in m[1]]


def delivered(conn: psycopg.Connection, alert: str, event: str) -> int:
    conn.commit()
    return sum(1 for d in alert_deliveries(conn, alert) if d.event == event and d.status == "delivered")
