"""The portal and its JSON API on the real database (the module's embedded stack), read as
grafana_reader with each request inside storage.access.scoped: tokens are required, the lab
sees every pilot, a startup only its own — another startup's experiment, devices, rejections,
alerts, impact and credentials are a 404 exactly like an id that does not exist, whether
listed or guessed. (The browser: tests/integration/test_portal_browser.py.)"""

from __future__ import annotations

import re
from datetime import timedelta

import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg.types.json import Jsonb

from dashboards.portal.app import create_app
from dashboards.portal.settings import PortalSettings
from pilotlab.contracts import Reason, Rejection, feedback_topic, telemetry_topic, to_ms, utcnow
from pilotlab.credentials import SECRET_FILE, derive_password, load_or_create_secret, stack_auth_dir
from pilotlab.manifest import Experiment
from storage import access
from storage.writer import write_experiments, write_rejections

pytestmark = pytest.mark.integration

A, B = "portal-alpha", "portal-beta"
PATHS = ("", "/devices", "/rejections", "/alerts", "/impact", "/credentials")


def experiment(exp_id: str, startup: str, prefix: str) -> Experiment:
    now = utcnow().replace(second=0, microsecond=0)
    return Experiment.model_validate(
        {
            "id": exp_id,
            "title": f"{startup} pilot",
            "startup": startup,
            "district": "Centro",
            "location": {"lat": 45.07, "lon": 7.68},
            "periods": {
                "baseline": {"start": (now - timedelta(hours=2)).isoformat(),
                             "end": (now - timedelta(hours=1)).isoformat()},
                "intervention": {"start": (now - timedelta(hours=1)).isoformat(), "end": now.isoformat()},
            },
            "devices": [
                {"id": f"{prefix}-t1", "kind": "air_quality", "group": "treatment", "interval": "1m"},
                {"id": f"{prefix}-c1", "kind": "air_quality", "group": "control", "interval": "1m"},
            ],
            "kpis": [{"name": "no2_impact", "metric": "no2", "kind": "impact"}],
        }
    )


def seed(conn: psycopg.Connection, exp: Experiment, verdict: str, estimate: float) -> None:
    """One pilot's rows as the pipeline writes them: readings, a device status, a rejection, a
    firing alert and an impact KPI."""
    now = utcnow()
    t1, c1 = (d.id for d in exp.devices)
    write_experiments(conn, [exp])
    conn.execute(
        "INSERT INTO readings (ts, experiment_id, device_id, device_group, metric, value, seq, received_at)"
        " SELECT %s - make_interval(mins => i), %s, %s, 'treatment', 'no2', 20 + i, i, now()"
        "   FROM generate_series(1, 30) i",
        (now, exp.id, t1),
    )
    # t1 online since its first reading (the streams worker's first report), c1 went silent
    conn.execute(
        "INSERT INTO device_status (experiment_id, device_id, status, ts, last_seen, detail)"
        " VALUES (%s, %s, 'online', %s - interval '30 minutes', %s - interval '30 minutes', 'first report'),"
        "        (%s, %s, 'offline', %s, NULL, '')",
        (exp.id, t1, now, now, exp.id, c1, now),
    )
    write_rejections(conn, [Rejection(
        Reason.WRONG_TYPE, f"metrics.no2: not a number ({exp.id})", telemetry_topic(exp.id, t1), to_ms(now),
        exp.id, t1, None, '{"seq": 1, "ts": "yesterday", "metrics": {"no2": "high"}}',
        rejection_id=f"rej-{exp.id}",
    )])
    conn.execute(
        "INSERT INTO alerts (alert_id, experiment_id, rule, kind, severity, subject, device_id, status, fired_at,"
        " threshold, value, summary) VALUES (%s, %s, 'offline', 'device_offline', 'warning', %s, %s, 'firing',"
        " %s, 600, 900, %s)",
        (f"alert-{exp.id}", exp.id, c1, c1, now, f"{c1} offline for 15 min"),
    )
    details = {"estimate": estimate, "ci_low": estimate - 0.05, "ci_high": estimate + 0.05, "scale": "relative",
               "verdict": verdict, "devices": {"treatment": 1, "control": 1}, "design": "difference-in-differences",
               "warnings": []}
    conn.execute(
        "INSERT INTO kpi_values (experiment_id, kpi, metric, kind, device_group, window_size_s, window_start,"
        " window_end, value, sample_count, revision, details) VALUES"
        " (%s, 'no2_impact', 'no2', 'impact', 'all', 0, %s, %s, %s, 30, 1, %s)",
        (exp.id, exp.periods.baseline.start, exp.periods.intervention.end, estimate, Jsonb(details)),
    )


@pytest.fixture(scope="module")
def world(stack, stack_state):
    exp_a, exp_b = experiment(A, "Alpha Air", "pa"), experiment(B, "BetaBike", "pb")
    load_or_create_secret(stack_auth_dir(stack.data_dir) / SECRET_FILE)
    with psycopg.connect(stack_state.owner_url) as conn:
        seed(conn, exp_a, "improved", -0.2)
        seed(conn, exp_b, "worsened", 0.3)
        write_rejections(conn, [Rejection(  # a payload that is markup: shown, never run
            Reason.MALFORMED_JSON, "not JSON", telemetry_topic(A, "pa-t1"), to_ms(utcnow() - timedelta(minutes=5)),
            A, "pa-t1", None, "<script>alert('x')</script>", rejection_id="rej-markup",
        )])
        conn.commit()
        tokens = {
            "lab": access.grant(conn, None, "portal test").token,
            "a": access.grant(conn, "Alpha Air", "portal test").token,
            "b": access.grant(conn, "BetaBike", "portal test").token,
        }
        revoked = access.grant(conn, "Alpha Air", "revoked")
        access.revoke(conn, revoked.token_id)
        tokens["revoked"] = revoked.token
        conn.commit()
    return {"tokens": tokens, "a": exp_a, "b": exp_b}


@pytest.fixture(scope="module")
def client(stack, stack_state, world):
    settings = PortalSettings(
        portal_database_url=stack_state.reader_url,
        portal_session_secret="portal-test-secret-" + "x" * 32,
        mqtt_url=stack_state.mqtt_url,
        portal_credentials_dir=stack_auth_dir(stack.data_dir),
    )
    with TestClient(create_app(settings)) as c:
        yield c


def api(client: TestClient, token: str | None, path: str):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return client.get(f"/api{path}", headers=headers)


def test_the_api_needs_a_valid_token(client, world):
    for token in (None, "not-a-token", "plt_0123456789abcdef_" + "A" * 43, world["tokens"]["revoked"]):
        r = api(client, token, "/experiments")
        assert r.status_code == 401, token
        assert r.headers["www-authenticate"] == "Bearer"
    assert api(client, None, f"/experiments/{A}/rejections").status_code == 401


def test_the_lab_sees_every_pilot(client, world):
    r = api(client, world["tokens"]["lab"], "/experiments")
    assert r.status_code == 200
    ids = {p["experiment"]["experiment_id"] for p in r.json()}
    assert {A, B} <= ids
    assert api(client, world["tokens"]["lab"], "/whoami").json() == {"startup": None, "lab": True}
    for exp in (A, B):
        for path in PATHS:
            assert api(client, world["tokens"]["lab"], f"/experiments/{exp}{path}").status_code == 200, path


def test_a_startup_lists_only_its_own(client, world):
    token = world["tokens"]["a"]
    assert api(client, token, "/whoami").json() == {"startup": "Alpha Air", "lab": False}
    pilots = api(client, token, "/experiments").json()
    assert [p["experiment"]["experiment_id"] for p in pilots] == [A]
    p = pilots[0]
    e = p["experiment"]
    counts = (e["devices_total"], e["devices_online"], e["samples"], e["rejections"], e["open_alerts"])
    assert counts == (2, 1, 30, 2, 1)
    assert e["rejection_rate"] == pytest.approx(2 / 32)
    assert [(i["verdict"], i["text"]) for i in p["impacts"]] == [("improved", "-20.0% [95% CI -25.0% … -15.0%]")]

    devices = api(client, token, f"/experiments/{A}/devices").json()
    assert {d["device_id"]: d["status"] for d in devices} == {"pa-t1": "online", "pa-c1": "offline"}
    rej, markup = api(client, token, f"/experiments/{A}/rejections").json()  # newest first
    assert markup["excerpt"] == "<script>alert('x')</script>"
    assert (rej["reason"], rej["device_id"]) == ("wrong_type", "pa-t1")
    assert rej["detail"] == f"metrics.no2: not a number ({A})" and '"high"' in rej["excerpt"]
    [alert] = api(client, token, f"/experiments/{A}/alerts").json()
    assert (alert["status"], alert["subject"]) == ("firing", "pa-c1")
    [imp] = api(client, token, f"/experiments/{A}/impact").json()
    assert imp["verdict"] == "improved" and imp["details"]["estimate"] == -0.2


def test_a_startups_credentials_are_its_devices_accounts(client, stack, world):
    creds = api(client, world["tokens"]["a"], f"/experiments/{A}/credentials").json()
    secret = load_or_create_secret(stack_auth_dir(stack.data_dir) / SECRET_FILE)
    assert {c["device_id"] for c in creds} == {"pa-t1", "pa-c1"}
    for c in creds:
        assert c["password"] == derive_password(secret, c["device_id"])
        assert c["publish_to"] == telemetry_topic(A, c["device_id"])
        assert c["feedback_from"] == feedback_topic(A, c["device_id"])
    lab_password = derive_password(secret, "pilotlab")
    assert lab_password not in str(creds)


@pytest.mark.parametrize("path", PATHS)
def test_another_startups_ids_are_not_found_like_missing_ones(client, world, path):
    token = world["tokens"]["a"]
    other = api(client, token, f"/experiments/{B}{path}")
    missing = api(client, token, f"/experiments/no-such-pilot{path}")
    assert other.status_code == missing.status_code == 404
    assert other.json()["detail"].replace(B, "X") == missing.json()["detail"].replace("no-such-pilot", "X")
    # and the other way round
    assert api(client, world["tokens"]["b"], f"/experiments/{A}{path}").status_code == 404
    assert api(client, world["tokens"]["b"], f"/experiments/{B}{path}").status_code == 200


def test_nothing_of_b_reaches_a_through_any_listing(client, world):
    token = world["tokens"]["a"]
    bodies = [api(client, token, "/experiments").text] + [
        api(client, token, f"/experiments/{A}{p}").text for p in PATHS
    ]
    for body in bodies:
        assert B not in body and "pb-" not in body and "BetaBike" not in body


# --- pages --------------------------------------------------------------------------------------


def login(client: TestClient, token: str):
    return client.post("/login", data={"token": token}, follow_redirects=False)


def test_pages_log_in_show_own_pilots_and_log_out(client, world):
    client.cookies.clear()
    r = client.get("/", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    bad = login(client, "wrong")
    assert bad.status_code == 401 and "not valid" in bad.text

    r = login(client, world["tokens"]["a"])
    assert r.status_code == 303 and r.headers["location"] == "/"
    home = client.get("/")
    assert home.status_code == 200
    assert "Alpha Air pilot" in home.text and "BetaBike" not in home.text
    assert "improved" in home.text and "-20.0% [95% CI -25.0% … -15.0%]" in home.text
    assert 'src="/static/htmx-2.0.11.min.js"' in home.text
    assert client.get("/static/htmx-2.0.11.min.js").status_code == 200

    page = client.get(f"/experiments/{A}")
    assert page.status_code == 200
    for text in ("pa-t1", "wrong_type", f"metrics.no2: not a number ({A})", "pa-c1 offline for 15 min",
                 telemetry_topic(A, "pa-t1")):
        assert text in page.text, text
    assert "&lt;script&gt;alert(" in page.text and "<script>alert(" not in page.text
    assert client.get(f"/experiments/{A}/live").status_code == 200
    report = client.get(f"/experiments/{A}/report")
    assert report.status_code == 200 and "pilot impact report" in report.text

    for path in (f"/experiments/{B}", f"/experiments/{B}/live", f"/experiments/{B}/report"):
        assert client.get(path).status_code == 404, path

    assert client.post("/logout", follow_redirects=False).status_code == 303
    assert client.get("/", follow_redirects=False).status_code == 303
    # a poll from a page left open after logout sends the whole page to the login form
    poll = client.get(f"/experiments/{A}/live", headers={"HX-Request": "true"})
    assert poll.status_code == 200 and poll.headers["hx-redirect"] == "/login"


def test_the_lab_page_lists_every_pilot_with_its_startup(client, world):
    client.cookies.clear()
    login(client, world["tokens"]["lab"])
    home = client.get("/fragments/overview")
    assert home.status_code == 200
    rows = re.findall(r'data-experiment="([^"]+)"', home.text)
    assert A in rows and B in rows
    assert "Alpha Air" in home.text and "BetaBike" in home.text and "worsened" in home.text
    client.post("/logout")


def test_the_session_cookie_is_signed(client, world):
    client.cookies.clear()
    login(client, world["tokens"]["a"])
    cookie = client.cookies.get("pilotlab_portal")
    assert cookie
    client.cookies.set("pilotlab_portal", cookie[:-2] + ("AA" if not cookie.endswith("AA") else "BB"))
    assert client.get("/", follow_redirects=False).status_code == 303
    client.cookies.clear()


def test_openapi_documents_the_api(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {f"/api/experiments/{{experiment_id}}{p}" for p in PATHS} <= set(paths)
    assert client.get("/api").status_code == 200
