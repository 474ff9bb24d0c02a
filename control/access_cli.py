"""``pilotlab access``: the lab grants and revokes the tokens of the portal/API and the startups'
own SQL logins (storage/access.py, docs/access.md). Every command connects as the owner role
(PILOTLAB_DATABASE_OWNER_URL, or the running embedded stack's, as ``pilotlab db migrate``)."""

from __future__ import annotations

import json
import shlex
from typing import Annotated

import typer

from pilotlab import settings as cfg

access_app = typer.Typer(
    help="Per-startup access: tokens for the portal/API and SQL logins, isolated by the database.",
    no_args_is_help=True,
)


def _owner_url() -> str:
    return cfg.load(cfg.MigrateSettings).database_owner_url


def _connect(url: str):
    import psycopg  # noqa: PLC0415

    return psycopg.connect(url, autocommit=True, connect_timeout=10)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


@access_app.command("grant")
def grant_cmd(
    startup: Annotated[str | None, typer.Option("--startup", help="The startup (experiments' `startup`).")] = None,
    lab: Annotated[bool, typer.Option("--lab", help="A lab token: every pilot.")] = False,
    label: Annotated[str, typer.Option("--label", help="What the token is for (shown by list).")] = "",
    sql_access: Annotated[
        bool, typer.Option("--sql", help="Also a PostgreSQL login for the startup's own role (replaces the previous).")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Create a token (printed once; only its hash is kept)."""
    from storage import access  # noqa: PLC0415

    if lab == (startup is not None):
        _fail("give exactly one of --startup NAME and --lab")
    if lab and sql_access:
        _fail("--sql is for a startup; the lab reads with its own roles (PILOTLAB_DATABASE_READER_URL)")
    url = _owner_url()
    with _connect(url) as conn:
        try:
            g = access.grant(conn, startup, label, sql=sql_access)
        except (access.AccessError, ValueError) as exc:
            _fail(str(exc))
        known = (
            conn.execute("SELECT count(*) FROM experiments WHERE startup = %s", (startup,)).fetchone()[0]
            if startup is not None
            else None
        )
    db_url = access.sql_url(url, g.role, g.sql_password) if g.sql_password else None
    if json_out:
        typer.echo(
            json.dumps(
                {"token_id": g.token_id, "token": g.token, "startup": g.startup, "role": g.role, "label": g.label}
                | ({"database_url": db_url} if db_url else {}),
                indent=2,
            )
        )
    else:
        who = f"startup {g.startup!r} (database role {g.role})" if g.startup is not None else "the lab (every pilot)"
        typer.echo(f"token for {who}, id {g.token_id}; shown once, only its hash is stored:")
        typer.echo(g.token)
        if db_url:
            typer.echo("SQL access as the startup's role (shown once; any earlier SQL grant of it stops working):")
            typer.echo(db_url)
            typer.echo(
                f"a Grafana datasource for it: pilotlab access grafana-datasource --startup {shlex.quote(g.startup)}"
            )
    if known == 0:
        typer.echo(f"note: no registered experiment has startup {startup!r} (yet): it sees nothing", err=True)


@access_app.command("revoke")
def revoke_cmd(token_id: str) -> None:
    """Revoke a token now (a SQL grant: the role's login goes and its sessions end)."""
    from storage import access  # noqa: PLC0415

    with _connect(_owner_url()) as conn:
        row = access.revoke(conn, token_id)
    if row is None:
        _fail(f"no active token {token_id}")
    extra = "; its SQL login is closed" if row.sql_login else ""
    typer.echo(f"revoked {row.token_id} ({row.startup or 'lab'}){extra}")


@access_app.command("list")
def list_cmd(json_out: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Every token granted (never a secret), newest first."""
    from storage import access  # noqa: PLC0415

    with _connect(_owner_url()) as conn:
        rows = access.list_grants(conn)
    if json_out:
        typer.echo(
            json.dumps(
                [
                    {
                        "token_id": r.token_id,
                        "startup": r.startup,
                        "role": r.role,
                        "label": r.label,
                        "sql": r.sql_login,
                        "created_at": r.created_at.isoformat(),
                        "revoked_at": r.revoked_at.isoformat() if r.revoked_at else None,
                    }
                    for r in rows
                ],
                indent=2,
            )
        )
        return
    if not rows:
        typer.echo("no tokens")
        return
    typer.echo(f"{'TOKEN ID':16}  {'FOR':28}  {'SQL':3}  {'CREATED':16}  {'REVOKED':16}  LABEL")
    for r in rows:
        revoked = r.revoked_at.strftime("%Y-%m-%d %H:%M") if r.revoked_at else "-"
        typer.echo(
            f"{r.token_id:16}  {(r.startup or '(lab)')[:28]:28}  {'yes' if r.sql_login else 'no':3}  "
            f"{r.created_at:%Y-%m-%d %H:%M}  {revoked:16}  {r.label}"
        )


@access_app.command("grafana-datasource")
def grafana_datasource_cmd(
    startup: Annotated[str, typer.Option("--startup", help="The startup with a SQL grant.")],
    host: Annotated[
        str | None, typer.Option("--host", help="host:port Grafana reaches PostgreSQL at (default: the owner URL's).")
    ] = None,
) -> None:
    """Print Grafana provisioning YAML for a datasource reading as the startup's role (password
    from $PILOTLAB_STARTUP_DB_PASSWORD in Grafana's environment: the one `grant --sql` printed)."""
    from storage import access  # noqa: PLC0415

    url = _owner_url()
    with _connect(url) as conn:
        row = conn.execute("SELECT role FROM startup_roles WHERE startup = %s", (startup,)).fetchone()
        mode = conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone()
    if row is None:
        _fail(f"startup {startup!r} has no grant: pilotlab access grant --startup NAME --sql")
    if host is not None:
        h, _, p = host.rpartition(":")
        if not h or not p.isdigit():
            _fail("--host must be host:port")
        url = f"postgresql://x@{h}:{p}/{url.rsplit('/', 1)[-1].split('?')[0]}"
    typer.echo(access.grafana_datasource(url, row[0], startup, timescaledb=mode is not None), nl=False)
