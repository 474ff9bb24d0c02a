"""Alert deliveries: payloads, signatures, back-off, which targets a transition goes to, the
e-mail, and the dispatcher's lanes (a hanging or failing receiver holds up only itself)."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import threading
import time

import orjson
import pytest

from pilotlab.alert_config import AlertDefaults, Targets, targets_for
from pilotlab.manifest import Experiment, Notify, Webhook
from streams.alerts import Transition
from streams.delivery import (
    Dispatcher,
    Due,
    Policy,
    SmtpConfig,
    backoff_s,
    email_message,
    payload,
    plan,
    sign,
    verify,
)

T0 = 1_772_409_600_000
EXP = Experiment.model_validate(
    {
        "id": "dx",
        "title": "Delivery test",
        "startup": "Acme",
        "district": "d",
        "location": {"lat": 45.0, "lon": 7.6},
        "periods": {
            "baseline": {"start": "2026-03-02T00:00:00Z", "end": "2026-03-02T01:00:00Z"},
            "intervention": {"start": "2026-03-02T01:00:00Z", "end": "2026-03-02T02:00:00Z"},
        },
        "devices": [{"id": "d1", "kind": "air_quality", "interval": "1m"}],
        "kpis": [{"name": "no2_mean", "metric": "no2", "kind": "mean", "window": "1m"}],
        "notify": {
            "webhooks": [{"name": "hook", "url": "http://127.0.0.1:1/h", "secret_env": "HOOK_SECRET"}],
            "email": ["a@x.test"],
        },
    }
)


def transition(status: str = "firing", device: str | None = "d1") -> Transition:
    subject = device or "no2_mean:treatment"
    at = T0 + (60_000 if status == "resolved" else 0)
    return Transition(
        "dx", "off", "device_offline", "warning", subject, device, status, T0, at, 300.0, None, "d1 silent"
    )


def test_payload_carries_the_episode_in_iso_time() -> None:
    fired, resolved = payload(transition(), EXP), payload(transition("resolved"), EXP)
    assert fired["fired_at"] == "2026-03-02T00:00:00Z" and fired["resolved_at"] is None
    assert resolved["resolved_at"] == "2026-03-02T00:01:00Z" and resolved["alert_id"] == fired["alert_id"]
    assert fired["startup"] == "Acme" and fired["experiment_title"] == "Delivery test"


def test_the_signature_is_an_hmac_sha256_of_the_exact_body() -> None:
    body = orjson.dumps(payload(transition(), EXP))
    header = sign(b"k3y", body)
    assert header == "sha256=" + hmac.new(b"k3y", body, hashlib.sha256).hexdigest()
    assert verify(b"k3y", body, header)
    assert not verify(b"k3y", body + b" ", header) and not verify(b"other", body, header)
    assert not verify(b"k3y", body, None)


@pytest.mark.parametrize(("attempts", "expected"), [(1, 2.0), (2, 4.0), (3, 8.0), (6, 60.0), (20, 60.0)])
def test_backoff_doubles_up_to_the_cap(attempts, expected) -> None:
    assert backoff_s(attempts, 2.0, 60.0) == expected


def test_plan_sends_device_alerts_everywhere_and_kpi_alerts_not_to_mqtt() -> None:
    targets = targets_for(EXP, AlertDefaults(notify=Notify(email=("lab@x.test",))))
    device = plan(transition(), EXP, targets, email=True, mqtt=True)
    assert [(d.channel, d.target) for d in device] == [
        ("webhook", "experiment:hook"),
        ("email", "a@x.test"),
        ("email", "lab@x.test"),
        ("mqtt", "pilots/dx/d1/feedback"),
    ]
    assert len({d.delivery_id for d in device}) == 4 and all(d.payload["delivery_id"] == d.delivery_id for d in device)
    kpi = plan(transition(device=None), EXP, targets, email=False, mqtt=True)
    assert [(d.channel, d.target) for d in kpi] == [("webhook", "experiment:hook")]
    # resolving goes to the same targets under other delivery ids; replanning gives the same ids
    again = plan(transition(), EXP, targets, email=True, mqtt=True)
    assert [d.delivery_id for d in again] == [d.delivery_id for d in device]
    resolved = plan(transition("resolved"), EXP, targets, email=True, mqtt=True)
    assert not {d.delivery_id for d in resolved} & {d.delivery_id for d in device}


def test_email_says_what_and_where() -> None:
    doc = plan(transition(), EXP, targets_for(EXP, AlertDefaults()), email=True, mqtt=False)[1].payload
    msg = email_message(doc, "alerts@lab.test", "a@x.test")
    assert msg["Subject"] == "[pilotlab] FIRING warning: d1 silent (dx)"
    assert msg["To"] == "a@x.test" and msg["X-Pilotlab-Delivery"] == doc["delivery_id"]
    assert doc["alert_id"] in msg.get_content()


def test_smtp_urls() -> None:
    assert SmtpConfig.parse("smtp://127.0.0.1:2525") == SmtpConfig("127.0.0.1", 2525, None, None, False, False)
    c = SmtpConfig.parse("smtp://user%40x:p%3Aw@mail.test:587?starttls=1")
    assert (c.username, c.password, c.starttls, c.tls) == ("user@x", "p:w", True, False)
    assert SmtpConfig.parse("smtps://mail.test").port == 465


# --- the dispatcher ----------------------------------------------------------------------------


class FakeStore:
    """The queue table in memory: rows due now or after their back-off."""

    def __init__(self, rows: list[Due]) -> None:
        self.rows = {r.delivery_id: [r, 0.0, "pending"] for r in rows}
        self.attempts: list[tuple[str, str, float]] = []
        self.lock = threading.Lock()

    def due(self, limit: int, exclude: set[str]) -> list[Due]:
        now = time.monotonic()
        with self.lock:
            return [
                r for r, at, st in self.rows.values() if st == "pending" and at <= now and r.delivery_id not in exclude
            ]

    def record_attempt(self, delivery_id, status, error, ms, retry_in) -> None:
        with self.lock:
            row = self.rows[delivery_id]
            row[0] = Due(row[0].delivery_id, row[0].channel, row[0].target, row[0].payload, row[0].attempts + 1)
            row[1] = time.monotonic() + (retry_in or 0)
            row[2] = status
            self.attempts.append((delivery_id, status, time.monotonic()))


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, code: int, hang: float = 0) -> None:
        self.hits: list[float] = []
        self.release = threading.Event()
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                outer.hits.append(time.monotonic())
                if hang:
                    outer.release.wait(hang)
                try:
                    self.send_response(code)
                    self.end_headers()
                except OSError:
                    pass

            def log_message(self, *_a) -> None:
                pass

        super().__init__(("127.0.0.1", 0), H)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"


def test_a_hanging_and_a_failing_receiver_hold_up_only_themselves() -> None:
    good, failing, hanging = Server(204), Server(503), Server(200, hang=10)
    hooks = {"good": good, "failing": failing, "hanging": hanging}
    webhooks = {f"experiment:{n}": Webhook(name=n, url=s.url(), secret_env="S") for n, s in hooks.items()}
    rows = [
        Due(
            f"{n}-{i}",
            "webhook",
            f"experiment:{n}",
            {"delivery_id": f"{n}-{i}", "status": "firing", "experiment_id": "dx"},
            0,
        )
        for i in range(3)
        for n in ("hanging", "failing", "good")
    ]
    store = FakeStore(rows)
    policy = Policy(
        webhook_timeout_s=1.0, smtp_timeout_s=1, retry_base_s=0.1, retry_cap_s=0.4, max_attempts=3, poll_s=0.02
    )
    d = Dispatcher(store, policy, lambda _e, t: webhooks.get(t), {"S": "secret"}).start()
    started = time.monotonic()
    try:
        deadline = started + 10
        while sum(1 for r in store.rows.values() if r[2] == "delivered") < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        good_done = time.monotonic() - started
        while any(r[2] == "pending" for k, r in store.rows.items() if k.startswith("failing")):
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        d.stop(timeout=0.1)
        for s in hooks.values():
            s.release.set()
            s.shutdown()
    assert good_done < 0.8, "the good receiver waited for the others"
    assert [r[2] for k, r in store.rows.items() if k.startswith("good")] == ["delivered"] * 3
    assert [(r[0].attempts, r[2]) for k, r in store.rows.items() if k.startswith("failing")] == [(3, "failed")] * 3
    # one attempt at a time per target: the hanging receiver got one request, not three
    assert len(hanging.hits) == 1
    # unknown webhooks and missing secrets are failed attempts, not crashes
    lost = FakeStore([Due("x", "webhook", "experiment:gone", {"delivery_id": "x", "experiment_id": "dx"}, 0)])
    d2 = Dispatcher(lost, policy, lambda _e, _t: None, {}).start()
    try:
        deadline = time.monotonic() + 5
        while lost.rows["x"][2] == "pending" and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        d2.stop(timeout=0.1)
    assert lost.rows["x"][2] == "failed"


def test_targets_find_webhooks_by_scope_and_name() -> None:
    t = Targets((("experiment", Webhook(name="a", url="http://a.test/", secret="x" * 16)),), (), True)
    assert t.webhook("experiment:a") is not None
    assert t.webhook("lab:a") is None and t.webhook("experiment:b") is None
