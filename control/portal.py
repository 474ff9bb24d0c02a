"""The web portal beside a running embedded stack (``pilotlab demo``): ``pilotlab serve`` as a
child process reading as the stack's reader role, with a lab token and one startup's token
granted for the run (storage.access) and revoked when it ends."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import psycopg

from control.services import ServiceError
from control.stack import StackState, free_port, port_busy
from storage import access

DEFAULT_PORT = 8088  # PortalSettings.portal_port's default: the URL a newcomer expects


@dataclass(frozen=True)
class PortalRun:
    url: str
    lab_token: str
    startup: str | None
    startup_token: str | None
    log: str

    def as_dict(self) -> dict:
        return asdict(self)


@contextlib.contextmanager
def portal_beside(
    state: StackState, data_dir: Path, log_dir: Path, startup: str | None, *, port: int | None = None,
    label: str = "demo", timeout: float = 60.0,
) -> Iterator[PortalRun]:
    """Serve the portal on ``port`` (default 8088, or a free port when that one is taken)
    until the block ends; tokens for the lab and ``startup`` are valid as long."""
    port = port or (DEFAULT_PORT if not port_busy(DEFAULT_PORT) else free_port())
    with psycopg.connect(state.owner_url) as conn:
        grants = [access.grant(conn, None, label)] + ([access.grant(conn, startup, label)] if startup else [])
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "portal.log"
    env = {**os.environ, **state.env(), "PILOTLAB_PORTAL_HOST": "127.0.0.1", "PILOTLAB_PORTAL_PORT": str(port)}
    proc = None
    try:
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "control", "serve", "--data-dir", str(data_dir)],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise ServiceError(f"the portal exited with code {proc.returncode}; see {log_path}")
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"{url}healthz", timeout=1).status == 200:
                    break
            if time.monotonic() > deadline:
                raise ServiceError(f"the portal did not answer within {timeout:.0f} s; see {log_path}")
            time.sleep(0.2)
        yield PortalRun(url, grants[0].token, startup, grants[1].token if startup else None, str(log_path))
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with psycopg.connect(state.owner_url) as conn:
            for g in grants:
                access.revoke(conn, g.token_id)
