"""``pilotlab dashboards push`` through grafana-client against a stand-in for Grafana's HTTP API
(the documented endpoints it calls: folders and ``POST /api/dashboards/db``), run in a thread.
Pushing twice must leave one dashboard per UID, at version 2, in one folder."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dashboards.build import FOLDER_UID, build_all, push

TOKEN = "glsa_test_token"


class FakeGrafana(BaseHTTPRequestHandler):
    folders: dict[str, dict]
    dashboards: dict[str, dict]
    calls: list[tuple[str, str]]

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorised(self) -> bool:
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self._reply(401, {"message": "Unauthorized"})
            return False
        return True

    def do_GET(self) -> None:
        self.calls.append(("GET", self.path))
        if not self._authorised():
            return
        if self.path.startswith("/api/folders/"):
            uid = self.path.rsplit("/", 1)[1]
            if uid in self.folders:
                return self._reply(200, self.folders[uid])
            return self._reply(404, {"message": "folder not found"})
        return self._reply(404, {"message": "not found"})

    def do_POST(self) -> None:
        self.calls.append(("POST", self.path))
        if not self._authorised():
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/api/folders":
            if body["uid"] in self.folders:
                return self._reply(409, {"message": "folder exists"})
            self.folders[body["uid"]] = {"uid": body["uid"], "title": body["title"]}
            return self._reply(200, self.folders[body["uid"]])
        if self.path == "/api/dashboards/db":
            dash = body["dashboard"]
            if body.get("folderUid") not in self.folders:
                return self._reply(400, {"message": "folder not found"})
            old = self.dashboards.get(dash["uid"])
            if old is not None and not body.get("overwrite"):
                return self._reply(412, {"status": "name-exists"})
            version = (old["version"] if old else 0) + 1
            self.dashboards[dash["uid"]] = {"dashboard": dash, "folderUid": body["folderUid"], "version": version}
            return self._reply(200, {"status": "success", "uid": dash["uid"], "version": version,
                                     "url": f"/d/{dash['uid']}"})
        return self._reply(404, {"message": "not found"})


@pytest.fixture
def grafana():
    handler = type("Handler", (FakeGrafana,), {"folders": {}, "dashboards": {}, "calls": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_push_twice_upserts_by_uid(grafana):
    url, state = grafana
    first = push(url, TOKEN)
    second = push(url, TOKEN)
    models = build_all()
    assert [p.uid for p in first] == [p.uid for p in second] == list(models)
    assert {p.version for p in first} == {1} and {p.version for p in second} == {2}
    assert list(state.folders) == [FOLDER_UID]
    assert sorted(state.dashboards) == sorted(models)
    for uid, stored in state.dashboards.items():
        assert stored["dashboard"] == models[uid] and stored["folderUid"] == FOLDER_UID
    assert state.calls.count(("POST", "/api/folders")) == 1


def test_push_with_a_wrong_token_fails_loudly(grafana):
    from grafana_client.client import GrafanaUnauthorizedError  # noqa: PLC0415

    url, state = grafana
    with pytest.raises(GrafanaUnauthorizedError):
        push(url, "wrong")
    assert state.dashboards == {}
