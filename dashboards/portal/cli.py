"""``pilotlab serve``: the web portal and its JSON API (registered by the CLI in control/cli.py).

Settings come from ``PILOTLAB_*`` (dashboards/portal/settings.py). Beside an embedded stack
(``--data-dir``, default ``.pilotlab``, holding a ``state.json``) two of them are filled when
unset, and the command says so: the session secret, from ``portal/session-secret`` in the data
directory (created once, mode 0600), and the directory of the lab's MQTT secret, so that
startups see their devices' credentials. Anywhere else an unset session secret stops it.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path
from typing import Annotated

import typer

SESSION_SECRET_VAR = "PILOTLAB_PORTAL_SESSION_SECRET"


def session_secret(path: Path) -> str:
    """The portal's session secret kept in ``path`` (64 hex characters; created once, 0600)."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")
    return value


def stack_defaults(data_dir: Path, environ: dict[str, str]) -> dict[str, str]:
    """The variables ``serve`` fills beside the embedded stack in ``data_dir`` (none elsewhere,
    none that is set)."""
    from pilotlab.credentials import SECRET_FILE, stack_auth_dir  # noqa: PLC0415

    if not (data_dir / "state.json").exists():
        return {}
    out = {}
    if not environ.get(SESSION_SECRET_VAR):
        out[SESSION_SECRET_VAR] = session_secret(data_dir / "portal" / "session-secret")
    auth = stack_auth_dir(data_dir)
    if not environ.get("PILOTLAB_CREDENTIALS_SECRET") and not environ.get("PILOTLAB_PORTAL_CREDENTIALS_DIR") \
            and (auth / SECRET_FILE).exists():
        out["PILOTLAB_PORTAL_CREDENTIALS_DIR"] = str(auth.resolve())
    return out


def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on (PILOTLAB_PORTAL_HOST, 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (PILOTLAB_PORTAL_PORT, 8088).")] = None,
    data_dir: Annotated[Path, typer.Option(help="The embedded stack's data directory, if any.")] = Path(".pilotlab"),
) -> None:
    """Serve the web portal and its JSON API: the city lab sees every pilot, a startup only its
    own (log in with a token from `pilotlab access grant`). The API's endpoints: /api."""
    import uvicorn  # noqa: PLC0415

    from dashboards.portal.app import create_app  # noqa: PLC0415
    from dashboards.portal.settings import PortalSettings  # noqa: PLC0415
    from pilotlab import settings as cfg  # noqa: PLC0415

    filled = stack_defaults(data_dir, dict(os.environ))
    for var in filled:
        typer.echo(f"note: {var} from the embedded stack in {data_dir}", err=True)
    os.environ.update(filled)
    overrides = {"PILOTLAB_PORTAL_HOST": host, "PILOTLAB_PORTAL_PORT": None if port is None else str(port)}
    os.environ.update({k: v for k, v in overrides.items() if v is not None})
    settings = cfg.load(PortalSettings)
    app = create_app(settings)
    typer.echo(f"pilotlab portal: http://{settings.portal_host}:{settings.portal_port}/", err=True)
    sys.stderr.flush()
    uvicorn.run(app, host=settings.portal_host, port=settings.portal_port, log_level="warning",
                access_log=False, proxy_headers=False)


def main() -> None:
    typer.run(serve)
