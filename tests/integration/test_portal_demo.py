"""`pilotlab demo --keep-serving`, as a newcomer runs it: the portal's URL and two tokens are
printed, and once the results are out the portal shows the three demo pilots with their
verdicts to the lab and one pilot to its startup; SIGTERM then stops the portal and the stack,
and the demo's tokens stop working with them."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psycopg
import pytest

from control.stack import Stack, pid_alive
from dashboards.impact_text import VERDICTS
from storage import access

pytestmark = pytest.mark.integration

DEMO_IDS = ["adaptive-lighting-borgo-po", "lez-san-salvario", "smart-parking-crocetta"]


def get(url: str, token: str):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_demo_serves_the_portal_with_the_three_pilots_and_stops_it(tmp_path: Path):
    data = tmp_path / "demo"
    proc = subprocess.Popen(
        [sys.executable, "-m", "control", "demo", "--duration", "5", "--json", "--keep-serving",
         "--data-dir", str(data)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy(),
    )
    err: list[str] = []
    out: list[str] = []
    held = threading.Event()

    def read_stderr() -> None:
        for line in proc.stderr:
            err.append(line)
            if "keep running; Ctrl-C stops them" in line:
                held.set()

    readers = [threading.Thread(target=read_stderr, daemon=True),
               threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)]
    for r in readers:
        r.start()
    try:
        deadline = time.monotonic() + 600
        while not held.is_set():
            assert proc.poll() is None, f"the demo exited ({proc.returncode}): {''.join(err)[-3000:]}"
            assert time.monotonic() < deadline, "the demo did not finish within 600 s"
            held.wait(1)
        text = "".join(err)
        url = re.search(r"^portal: (http://127\.0\.0\.1:\d+/)", text, re.M).group(1)
        lab = re.search(r"lab token \(every pilot\): (\S+)", text).group(1)
        startup, startup_token = re.search(r"startup token \((.+): its pilot only\): (\S+)", text).groups()

        status, pilots = get(f"{url}api/experiments", lab)
        assert status == 200
        assert sorted(p["experiment"]["experiment_id"] for p in pilots) == DEMO_IDS
        for p in pilots:
            assert p["impacts"], p["experiment"]["experiment_id"]
            for imp in p["impacts"]:
                assert imp["verdict"] in VERDICTS and "95% CI" in imp["text"], imp
            e = p["experiment"]
            assert e["devices_online"] == e["devices_total"] > 0 and e["completeness"] > 0.9, e
            assert e["rejections"] > 0, e  # the demo sends broken payloads
        with urllib.request.urlopen(url + "login", timeout=30) as r:
            assert r.status == 200

        status, own = get(f"{url}api/experiments", startup_token)
        assert status == 200 and [p["experiment"]["startup"] for p in own] == [startup]
        others = [i for i in DEMO_IDS if i != own[0]["experiment"]["experiment_id"]]
        assert all(get(f"{url}api/experiments/{i}/rejections", startup_token)[0] == 404 for i in others)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for r in readers:
            r.join(10)
        state = Stack(data).load()
        left = [s.name for s in state.services.values() if pid_alive(s.pid, s.binary)] if state else []
    assert proc.returncode == 0, "".join(err)[-3000:]
    result = json.loads("".join(out))  # stdout: the demo's one JSON document, with the portal beside it
    assert [e["id"] for e in result["experiments"]] == DEMO_IDS
    assert result["portal"]["url"] == url and result["portal"]["lab_token"] == lab
    assert not left, f"left running: {left}"
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "healthz", timeout=5)
    # the demo's tokens were revoked with it (the data directory keeps the database)
    try:
        with psycopg.connect(Stack(data).up().owner_url) as conn:
            assert access.authenticate(conn, lab) is None and access.authenticate(conn, startup_token) is None
    finally:
        Stack(data).down(purge=True)
