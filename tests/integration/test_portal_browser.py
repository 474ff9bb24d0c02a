"""The portal in a real headless browser: Debian's Chromium (/usr/bin/chromium) driven by
Playwright, which is pointed at it (``executable_path``) and never downloads a browser.

A startup logs in with its token, sees its pilot, copies a device's password from the page,
publishes a broken message as that device over MQTT, and watches the rejection appear on the
open page (htmx polling, no reload); it logs out; a second startup sees neither the pilot nor
the rejection. Everything runs for real: ``pilotlab serve`` as a subprocess, ingest and the sink
on the module's embedded stack. Skips, saying why, where there is no Chromium or Playwright.

``PILOTLAB_PORTAL_SCREENSHOT=FILE.png`` also saves the startup's page once the rejection is on
it (docs/portal.md).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from datetime import timedelta
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from control.services import Services
from control.stack import free_port
from pilotlab import credentials, registry
from pilotlab.contracts import telemetry_topic, utcnow
from pilotlab.credentials import MqttEndpoint
from pilotlab.manifest import Experiment
from storage import access

pytestmark = pytest.mark.integration

CHROMIUM = os.environ.get("PILOTLAB_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
playwright_api = pytest.importorskip("playwright.sync_api", reason="no Playwright (pip install playwright)")
if not Path(CHROMIUM).exists():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)

WAIT_MS = 90_000  # the longest a page may take to show what it waits for (a ceiling, not a measure)
MARKER = f"browser-{uuid.uuid4().hex[:8]}"


def experiment(exp_id: str, startup: str, prefix: str) -> Experiment:
    now = utcnow().replace(second=0, microsecond=0)
    return Experiment.model_validate(
        {
            "id": exp_id,
            "title": f"{startup} street pilot",
            "startup": startup,
            "district": "Borgo",
            "location": {"lat": 45.07, "lon": 7.68},
            "periods": {
                "baseline": {"start": (now - timedelta(hours=2)).isoformat(),
                             "end": (now - timedelta(hours=1)).isoformat()},
                "intervention": {"start": (now - timedelta(hours=1)).isoformat(),
                                 "end": (now + timedelta(hours=1)).isoformat()},
            },
            "devices": [
                {"id": f"{prefix}-t1", "kind": "air_quality", "group": "treatment", "interval": "1m"},
                {"id": f"{prefix}-c1", "kind": "air_quality", "group": "control", "interval": "1m"},
            ],
            "kpis": [{"name": "no2_mean", "metric": "no2", "kind": "mean", "window": "1m"}],
        }
    )


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout:.0f} s")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def pilots(stack, stack_state):
    """Two startups' pilots registered (Kafka, the broker's accounts) and a token for each."""
    gamma, delta = experiment("browser-gamma", "Gamma Grid", "bg"), experiment("browser-delta", "Delta Drive", "bd")
    registry.publish(stack_state.kafka_bootstrap, [gamma, delta])
    credentials.sync_stack(stack.data_dir, stack_state.services["mqtt"].pid, [gamma, delta])
    with psycopg.connect(stack_state.owner_url) as conn:
        tokens = {"gamma": access.grant(conn, "Gamma Grid", "browser test").token,
                  "delta": access.grant(conn, "Delta Drive", "browser test").token}
    return {"gamma": gamma, "delta": delta, "tokens": tokens}


@pytest.fixture(scope="module")
def pipeline(stack, stack_state, pilots):
    """Ingest and the sink: a message a device publishes becomes a row of rejections."""
    with Services(stack_state, stack.logs / "services-portal-browser").start("ingest", "sink") as services:
        services.wait_ingest_ready()
        with psycopg.connect(stack_state.owner_url, autocommit=True) as conn:
            wait_for(lambda: conn.execute("SELECT count(*) FROM experiments WHERE experiment_id = ANY(%s)",
                                          (["browser-gamma", "browser-delta"],)).fetchone()[0] == 2,
                     60, "the sink did not store the two experiments")
        yield services


@pytest.fixture(scope="module")
def portal(stack, stack_state, pipeline):
    """``pilotlab serve`` as a subprocess on a free port, beside the module's stack."""
    port = free_port()
    env = {
        **os.environ,
        "PILOTLAB_DATABASE_READER_URL": stack_state.reader_url,
        "PILOTLAB_MQTT_URL": stack_state.mqtt_url,
        "PILOTLAB_PORTAL_REFRESH_S": "1",
    }
    for var in ("PILOTLAB_PORTAL_SESSION_SECRET", "PILOTLAB_PORTAL_DATABASE_URL", "PILOTLAB_CREDENTIALS_SECRET"):
        env.pop(var, None)
    log_path = stack.logs / "portal.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "control", "serve", "--port", str(port), "--data-dir", str(stack.data_dir)],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"pilotlab serve exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                return urllib.request.urlopen(f"{url}/healthz", timeout=1).status == 200
            return False

        wait_for(up, 60, "pilotlab serve did not answer /healthz")
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        # --no-sandbox: Chromium's sandbox cannot start as root (CI runs as root)
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def publish_as_device(mqtt_url: str, device: str, password: str, topic: str, payload: bytes) -> None:
    """Connect with the device's own account (retried while the broker reloads its files)
    and publish one message at QoS 1."""
    ep = MqttEndpoint.parse(mqtt_url)
    deadline = time.monotonic() + 30
    while True:
        client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"{device}-{MARKER}")
        client.username_pw_set(device, password)
        connack = []
        client.on_connect = lambda _c, _u, _f, rc, _p, box=connack: box.append(rc)
        client.connect(ep.host, ep.port)
        client.loop_start()
        try:
            wait_for(lambda box=connack: box, 10, "no CONNACK")
            if not connack[0].is_failure:
                info = client.publish(topic, payload, qos=1)
                info.wait_for_publish(timeout=30)
                assert info.is_published()
                return
        finally:
            client.disconnect()
            client.loop_stop()
        if time.monotonic() > deadline:
            raise AssertionError(f"{device} refused by the broker: {connack[0]}")
        time.sleep(0.5)


def log_in(page, url: str, token: str) -> None:
    page.goto(f"{url}/login")
    page.get_by_label("Token").fill(token)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(f"{url}/")


def test_a_startup_sees_its_rejection_appear_and_another_does_not(browser, portal, pilots, stack_state):
    expect = playwright_api.expect
    gamma, delta = pilots["gamma"], pilots["delta"]
    device = gamma.devices[0].id

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(portal)
    expect(page).to_have_url(f"{portal}/login")  # nothing without a token
    log_in(page, portal, pilots["tokens"]["gamma"])
    expect(page.get_by_test_id("who")).to_contain_text("Gamma Grid")
    expect(page.locator("#pilots")).to_contain_text(gamma.title)
    expect(page.locator("#pilots")).not_to_contain_text(delta.title)

    page.get_by_role("link", name=gamma.title).click()
    expect(page.locator("h1")).to_have_text(gamma.title)
    expect(page.locator("#devices")).to_contain_text(device)
    expect(page.locator("#live")).to_contain_text("No rejection")
    page.evaluate("window.__notReloaded = true")  # gone if the page were loaded again

    # the startup's own device, with the password the page shows it
    row = page.locator(f'#credentials tr[data-device="{device}"]')
    row.get_by_text("show").click()
    password = row.locator("code.secret").inner_text()
    row.get_by_text("show").click()  # hidden again (and so in a screenshot)
    assert password == credentials.stack_device_password(Path(stack_state.data_dir), device)
    bad = b'{"seq": 1, "ts": 1, "metrics": {"no2": "' + MARKER.encode() + b'"}}'
    publish_as_device(stack_state.mqtt_url, device, password, telemetry_topic(gamma.id, device), bad)

    rejections = page.locator("#rejections")
    expect(rejections).to_contain_text(MARKER, timeout=WAIT_MS)  # htmx polls; the page stays
    rejection = rejections.locator("tbody tr").filter(has_text=MARKER)
    expect(rejection).to_contain_text(device)
    reason = rejection.locator("code.reason").inner_text()
    assert reason and reason != "—"
    assert page.evaluate("window.__notReloaded") is True
    if shot := os.environ.get("PILOTLAB_PORTAL_SCREENSHOT"):
        Path(shot).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=shot, full_page=True)

    page.get_by_role("button", name="Log out").click()
    expect(page).to_have_url(f"{portal}/login")
    page.goto(f"{portal}/experiments/{gamma.id}")
    expect(page).to_have_url(f"{portal}/login")
    context.close()

    # the second startup: its own pilot, not the first one's, nor its rejection, even by URL
    other = browser.new_context()
    page = other.new_page()
    log_in(page, portal, pilots["tokens"]["delta"])
    expect(page.locator("#pilots")).to_contain_text(delta.title)
    expect(page.locator("#pilots")).not_to_contain_text(gamma.title)
    response = page.goto(f"{portal}/experiments/{gamma.id}")
    assert response is not None and response.status == 404
    expect(page.locator("body")).not_to_contain_text(MARKER)
    page.goto(f"{portal}/experiments/{delta.id}")
    expect(page.locator("#live")).to_contain_text("No rejection")
    expect(page.locator("body")).not_to_contain_text(MARKER)
    other.close()
