"""Alert deliveries: what to send where (pure), how to sign it, and the background queue that
sends it by webhook, e-mail and MQTT.

The queue is the ``alert_deliveries`` table: the alerts service inserts one row per
transition and target in the same transaction as the alert itself, and the
:class:`Dispatcher` sends the due rows from its own threads. Each target (one webhook, one
address, one topic) has its own lane, one attempt at a time, so a receiver that hangs holds up
nothing but its own later deliveries; the consumer never waits for any of them. A failed
attempt is tried again after ``base × 2^(attempts−1)`` seconds (capped), up to a maximum of
attempts, then the row is ``failed``; every attempt is recorded in the row (``attempts``,
``last_error``, ``history``). Delivery is at least once: a receiver de-duplicates on the
``X-Pilotlab-Delivery`` header (or ``delivery_id`` in the body).

Webhooks: ``POST`` of the JSON payload with ``Content-Type: application/json``,
``X-Pilotlab-Event: alert.firing|alert.resolved``, ``X-Pilotlab-Delivery: <delivery id>`` and
``X-Pilotlab-Signature: sha256=<hex HMAC-SHA256 of the exact body bytes>`` keyed with the
webhook's secret; any 2xx is success. E-mail: one plain-text message per address through
smtplib. MQTT: ``{"alerts": [payload]}`` at QoS 1 to the device's feedback topic.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import smtplib
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from email.message import EmailMessage
from urllib.parse import parse_qs, unquote, urlparse

import orjson

from pilotlab.alert_config import Targets
from pilotlab.contracts import feedback_topic, from_ms
from pilotlab.manifest import Experiment, Webhook
from streams.alerts import Transition

log = logging.getLogger("pilotlab.alerts.delivery")

SIGNATURE_HEADER = "X-Pilotlab-Signature"
DELIVERY_HEADER = "X-Pilotlab-Delivery"
EVENT_HEADER = "X-Pilotlab-Event"
HISTORY_KEPT = 20


# --- pure: payloads, signatures, back-off, what goes where --------------------------------------


def _iso(ms: int | None) -> str | None:
    return None if ms is None else from_ms(ms).isoformat().replace("+00:00", "Z")


def payload(t: Transition, experiment: Experiment) -> dict:
    """The JSON document every channel carries (docs/alerts.md)."""
    return {
        "alert_id": t.alert_id,
        "status": t.status,
        "experiment_id": t.experiment_id,
        "experiment_title": experiment.title,
        "startup": experiment.startup,
        "rule": t.rule,
        "kind": t.kind,
        "severity": t.severity,
        "subject": t.subject,
        "device_id": t.device_id,
        "fired_at": _iso(t.fired_at_ms),
        "resolved_at": _iso(t.at_ms) if t.status == "resolved" else None,
        "value": t.value,
        "threshold": t.threshold,
        "summary": t.summary,
    }


def sign(secret: bytes, body: bytes) -> str:
    """The ``X-Pilotlab-Signature`` value of a body."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify(secret: bytes, body: bytes, header: str | None) -> bool:
    """What a receiver does: recompute over the raw body, compare in constant time."""
    return header is not None and hmac.compare_digest(sign(secret, body), header)


def backoff_s(attempts: int, base_s: float, cap_s: float) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt: base, 2·base, 4·base, … ≤ cap."""
    return min(cap_s, base_s * 2 ** max(0, attempts - 1))


@dataclass(frozen=True, slots=True)
class Delivery:
    delivery_id: str
    alert_id: str
    event: str
    channel: str  # webhook | email | mqtt
    target: str  # experiment:NAME / lab:NAME, an address, a topic
    payload: dict


def delivery_id(alert: str, event: str, channel: str, target: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    for part in (alert, event, channel, target):
        h.update(len(part).to_bytes(4, "big"))
        h.update(part.encode())
    return h.hexdigest()


def plan(t: Transition, experiment: Experiment, targets: Targets, *, email: bool, mqtt: bool) -> list[Delivery]:
    """The deliveries of one transition: every webhook, every address (when e-mail is on),
    and the device's feedback topic for a device-level alert (when MQTT is on and wanted)."""
    doc = payload(t, experiment)
    wanted: list[tuple[str, str]] = [("webhook", f"{scope}:{h.name}") for scope, h in targets.webhooks]
    if email:
        wanted += [("email", a) for a in targets.email]
    if mqtt and targets.mqtt_feedback and t.device_id is not None:
        wanted.append(("mqtt", feedback_topic(t.experiment_id, t.device_id)))
    out = []
    for channel, target in wanted:
        did = delivery_id(t.alert_id, t.status, channel, target)
        out.append(Delivery(did, t.alert_id, t.status, channel, target, {**doc, "delivery_id": did}))
    return out


def email_message(doc: dict, sender: str, to: str) -> EmailMessage:
    msg = EmailMessage()
    state = "FIRING" if doc["status"] == "firing" else "RESOLVED"
    msg["Subject"] = f"[pilotlab] {state} {doc['severity']}: {doc['summary']} ({doc['experiment_id']})"
    msg["From"] = sender
    msg["To"] = to
    msg["X-Pilotlab-Alert"] = doc["alert_id"]
    msg[DELIVERY_HEADER] = doc["delivery_id"]
    lines = [
        f"{state}: {doc['summary']}",
        "",
        f"experiment  {doc['experiment_id']} — {doc['experiment_title']} ({doc['startup']})",
        f"rule        {doc['rule']} ({doc['kind']}, {doc['severity']})",
        f"subject     {doc['subject']}",
        f"fired at    {doc['fired_at']}",
    ]
    if doc["resolved_at"]:
        lines.append(f"resolved at {doc['resolved_at']}")
    lines += [f"value       {doc['value']}", f"threshold   {doc['threshold']}", "", orjson.dumps(doc).decode()]
    msg.set_content("\n".join(lines) + "\n")
    return msg


# --- senders (I/O) --------------------------------------------------------------------------------


class DeliveryError(Exception):
    """One failed attempt, with a one-line reason (stored in ``last_error``)."""


def post_webhook(url: str, secret: bytes, doc: dict, timeout_s: float) -> None:
    body = orjson.dumps(doc)
    req = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "User-Agent": "pilotlab-alerts",
            SIGNATURE_HEADER: sign(secret, body),
            DELIVERY_HEADER: doc["delivery_id"],
            EVENT_HEADER: f"alert.{doc['status']}",
        },
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            resp.read(65536)
    except urllib.error.HTTPError as exc:
        raise DeliveryError(f"HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DeliveryError(f"{type(reason).__name__}: {reason}") from None


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    host: str
    port: int
    username: str | None
    password: str | None
    tls: bool  # smtps://
    starttls: bool

    @classmethod
    def parse(cls, url: str) -> SmtpConfig:
        u = urlparse(url)
        tls = u.scheme == "smtps"
        query = parse_qs(u.query)
        return cls(
            host=u.hostname or "127.0.0.1",
            port=u.port or (465 if tls else 25),
            username=unquote(u.username) if u.username else None,
            password=unquote(u.password) if u.password else None,
            tls=tls,
            starttls=query.get("starttls", ["0"])[0].lower() in ("1", "true", "yes"),
        )


def send_email(cfg: SmtpConfig, msg: EmailMessage, timeout_s: float) -> None:
    try:
        if cfg.tls:
            smtp = smtplib.SMTP_SSL(cfg.host, cfg.port, timeout=timeout_s, context=ssl.create_default_context())
        else:
            smtp = smtplib.SMTP(cfg.host, cfg.port, timeout=timeout_s)
        with smtp:
            if cfg.starttls:
                smtp.starttls(context=ssl.create_default_context())
            if cfg.username:
                smtp.login(cfg.username, cfg.password or "")
            smtp.send_message(msg)
    except (smtplib.SMTPException, OSError) as exc:
        raise DeliveryError(f"{type(exc).__name__}: {str(exc).strip()[:200]}") from None


class MqttFeedback:
    """One paho client (the lab's account) that publishes alerts to feedback topics."""

    def __init__(
        self, url: str, username: str | None, password: str | None, ca_file: str | None, client_id: str
    ) -> None:
        import paho.mqtt.client as mqtt  # noqa: PLC0415
        from paho.mqtt.enums import CallbackAPIVersion  # noqa: PLC0415

        from pilotlab.credentials import MqttEndpoint  # noqa: PLC0415

        self.endpoint = MqttEndpoint.parse(url, username, password)
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id)
        self.endpoint.configure(self.client, ca_file)
        self.client.reconnect_delay_set(min_delay=1, max_delay=5)

    def start(self) -> None:
        self.client.connect_async(self.endpoint.host, self.endpoint.port, keepalive=30)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def publish(self, topic: str, doc: dict, timeout_s: float) -> None:
        if not self.client.is_connected():
            raise DeliveryError(f"not connected to the MQTT broker {self.endpoint.host}:{self.endpoint.port}")
        info = self.client.publish(topic, orjson.dumps({"alerts": [doc]}), qos=1)
        try:
            info.wait_for_publish(timeout=timeout_s)
        except (RuntimeError, ValueError) as exc:
            raise DeliveryError(f"MQTT publish failed: {exc}") from None
        if not info.is_published():
            raise DeliveryError(f"MQTT broker did not acknowledge within {timeout_s:.0f} s")


# --- the background queue -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Due:
    """A due row of ``alert_deliveries``."""

    delivery_id: str
    channel: str
    target: str
    payload: dict
    attempts: int


@dataclass(frozen=True, slots=True)
class Policy:
    webhook_timeout_s: float
    smtp_timeout_s: float
    retry_base_s: float
    retry_cap_s: float
    max_attempts: int
    poll_s: float


class Dispatcher:
    """Sends the due rows of ``alert_deliveries`` in background threads, one lane per target.

    ``store`` is the table (``streams.alert_store.DeliveryStore``); ``webhook_of(experiment_id,
    target)`` finds a webhook in the configuration in force; ``env`` holds the secrets that
    webhooks name by ``secret_env``."""

    def __init__(
        self,
        store,
        policy: Policy,
        webhook_of: Callable[[str, str], Webhook | None],
        env: Mapping[str, str],
        *,
        smtp: SmtpConfig | None = None,
        smtp_from: str = "pilotlab@localhost",
        mqtt: MqttFeedback | None = None,
    ) -> None:
        self.store, self.policy, self.webhook_of, self.env = store, policy, webhook_of, env
        self.smtp, self.smtp_from, self.mqtt = smtp, smtp_from, mqtt
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self._lanes: dict[str, ThreadPoolExecutor] = {}
        self._inflight: set[str] = set()
        self._futures: set[Future] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="alert-dispatcher", daemon=True)
        self.sent = 0
        self.failed_attempts = 0

    def start(self) -> Dispatcher:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """No new attempts; those under way get up to ``timeout`` to finish and be recorded. An
        attempt cut short stays due in the table and is made again after a restart."""
        self.stopping.set()
        self.wake.set()
        self._thread.join(timeout)
        for lane in self._lanes.values():
            lane.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            running = list(self._futures)
        _, cut = wait(running, timeout=timeout)
        if cut:
            log.info("%d delivery attempts still under way at shutdown: they stay due", len(cut))

    def _run(self) -> None:
        while not self.stopping.is_set():
            self.wake.wait(self.policy.poll_s)
            self.wake.clear()
            try:
                with self._lock:
                    busy = set(self._inflight)
                due = self.store.due(limit=200, exclude=busy)
            except Exception as exc:  # noqa: BLE001 - the database away: try again next round
                log.warning("delivery queue not readable (%s); trying again", str(exc).strip()[:200])
                self.stopping.wait(1.0)
                continue
            for row in due:
                key = f"{row.channel}|{row.target}"
                lane = self._lanes.get(key)
                if lane is None:
                    lane = self._lanes[key] = ThreadPoolExecutor(1, thread_name_prefix=f"alert-{row.channel}")
                with self._lock:
                    self._inflight.add(row.delivery_id)
                    future = lane.submit(self._attempt, row)
                    self._futures.add(future)
                future.add_done_callback(self._futures.discard)

    def _attempt(self, row: Due) -> None:
        started = time.monotonic()
        error = None
        try:
            self._send(row)
        except DeliveryError as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - a sender's bug must not end its lane
            error = f"{type(exc).__name__}: {exc}"
        ms = int((time.monotonic() - started) * 1000)
        attempts = row.attempts + 1
        if error is None:
            self.sent += 1
            outcome, retry_in = "delivered", None
        else:
            self.failed_attempts += 1
            if attempts >= self.policy.max_attempts:
                outcome, retry_in = "failed", None
            else:
                outcome = "pending"
                retry_in = backoff_s(attempts, self.policy.retry_base_s, self.policy.retry_cap_s)
            log.warning(
                "delivery %s to %s %s failed (attempt %d): %s%s",
                row.delivery_id[:12],
                row.channel,
                row.target,
                attempts,
                error,
                f"; again in {retry_in:g} s" if retry_in else "; giving up",
            )
        try:
            self.store.record_attempt(row.delivery_id, outcome, error, ms, retry_in)
        except Exception as exc:  # noqa: BLE001 - not recorded: the row stays due and is tried again
            log.warning("delivery %s: attempt not recorded (%s)", row.delivery_id[:12], str(exc).strip()[:200])
        finally:
            with self._lock:
                self._inflight.discard(row.delivery_id)

    def _send(self, row: Due) -> None:
        doc = row.payload
        if row.channel == "webhook":
            hook = self.webhook_of(doc["experiment_id"], row.target)
            if hook is None:
                raise DeliveryError(f"webhook {row.target} is no longer configured")
            secret = hook.secret if hook.secret is not None else self.env.get(hook.secret_env or "")
            if not secret:
                raise DeliveryError(f"the signing secret ${hook.secret_env} is not set for the alerts service")
            post_webhook(hook.url, secret.encode(), doc, self.policy.webhook_timeout_s)
        elif row.channel == "email":
            if self.smtp is None:
                raise DeliveryError("no SMTP server configured (PILOTLAB_SMTP_URL)")
            send_email(self.smtp, email_message(doc, self.smtp_from, row.target), self.policy.smtp_timeout_s)
        elif row.channel == "mqtt":
            if self.mqtt is None:
                raise DeliveryError("no MQTT broker configured (PILOTLAB_MQTT_URL)")
            self.mqtt.publish(row.target, doc, self.policy.webhook_timeout_s)
        else:
            raise DeliveryError(f"unknown channel {row.channel!r}")
