"""Build the dashboards' JSON models into files, and push them to a Grafana server.

``pilotlab dashboards build --out DIR`` writes one ``<uid>.json`` per dashboard (the files
``deploy/grafana/dashboards`` holds for docker-compose's provisioning). ``pilotlab dashboards
push --url URL --token TOKEN`` upserts them through Grafana's HTTP API (grafana-client): each
dashboard is saved by its stable UID with ``overwrite``, into the folder ``PilotLab``, so
pushing twice leaves one copy of each, at its newest version.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dashboards import device_health, experiment_detail, overview, pipeline

MODULES = (overview, experiment_detail, device_health, pipeline)
FOLDER_UID = "pilotlab"
FOLDER_TITLE = "PilotLab"


def build_all() -> dict[str, dict]:
    """UID → dashboard JSON model, in a fixed order."""
    return {m.UID: m.build() for m in MODULES}


def dumps(model: dict) -> str:
    """The canonical text of a model: stable key order, so that a rebuild changes no byte."""
    return json.dumps(model, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for uid, model in build_all().items():
        path = out_dir / f"{uid}.json"
        path.write_text(dumps(model), encoding="utf-8")
        paths.append(path)
    return paths


def upsert_payload(model: dict, folder_uid: str = FOLDER_UID) -> dict:
    """What ``POST /api/dashboards/db`` takes to create or replace the dashboard with this UID.
    ``id`` is dropped: Grafana matches on ``uid`` and ``overwrite`` replaces any version."""
    dashboard = {k: v for k, v in model.items() if k != "id"}
    return {
        "dashboard": dashboard,
        "folderUid": folder_uid,
        "overwrite": True,
        "message": "pilotlab dashboards push",
    }


@dataclass(frozen=True)
class Pushed:
    uid: str
    status: str
    version: int | None
    url: str | None


def push(url: str, token: str, timeout: float = 30.0, log: Callable[[str], None] | None = None) -> list[Pushed]:
    """Create the ``PilotLab`` folder if missing and upsert every dashboard by UID."""
    from grafana_client import GrafanaApi  # noqa: PLC0415
    from grafana_client.client import GrafanaClientError  # noqa: PLC0415

    api = GrafanaApi.from_url(url, credential=token or None, timeout=timeout)
    try:
        api.folder.get_folder(FOLDER_UID)
    except GrafanaClientError as exc:
        if exc.status_code != 404:
            raise
        api.folder.create_folder(FOLDER_TITLE, uid=FOLDER_UID)
        if log:
            log(f"created folder {FOLDER_TITLE} ({FOLDER_UID})")
    out = []
    for uid, model in build_all().items():
        res = api.dashboard.update_dashboard(upsert_payload(model))
        out.append(Pushed(uid, str(res.get("status", "")), res.get("version"), res.get("url")))
    return out
