"""Versioned SQL migrations in ``storage/migrations``, applied in order, each in its own
transaction, recorded in ``schema_migrations``. Applying twice changes nothing.

File names: ``NNNN_name.sql`` applies in every mode; ``NNNN_name.timescaledb.sql`` and
``NNNN_name.postgresql.sql`` are the two variants of one version, and the one matching the
database's mode is applied. The mode is detected, never configured: when the TimescaleDB
extension is installed, or available to ``CREATE EXTENSION``, the mode is ``timescaledb``;
otherwise ``postgresql`` (plain PostgreSQL with a ``time_bucket``-compatible function,
BRIN indexes and plain views in place of continuous aggregates).

Run them as the owner role (``pilotlab_owner``, ``PILOTLAB_DATABASE_OWNER_URL``): what a
migration creates belongs to whoever runs it, and the login roles get their privileges from
the migrations (see ``storage.roles``). Run by a superuser (PGlite, a hand-made database) they
still apply, with a warning: the objects then belong to that superuser.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources

import psycopg

log = logging.getLogger(__name__)

_LOCK_ID = 0x70696C6F  # advisory lock: two migrators never interleave
MODES = ("timescaledb", "postgresql")


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    sql: str  # for every mode ("") or the variant of one mode
    mode: str = ""


def available(mode: str | None = None) -> list[Migration]:
    """All migrations in version order; with ``mode``, only what applies in that mode."""
    files = sorted(
        (f for f in resources.files("storage.migrations").iterdir() if f.name.endswith(".sql")),
        key=lambda f: f.name,
    )
    out = []
    for f in files:
        stem = f.name.removesuffix(".sql")
        stem, _, variant = stem.partition(".")
        if variant and variant not in MODES:
            raise ValueError(f"{f.name}: unknown mode {variant!r} (expected one of {', '.join(MODES)})")
        if mode is not None and variant and variant != mode:
            continue
        version, _, name = stem.partition("_")
        out.append(Migration(version, name, f.read_text(encoding="utf-8"), variant))
    return out


def installed_mode(conn: psycopg.Connection) -> str:
    """``timescaledb`` when the extension is installed in this database, else ``postgresql``."""
    row = conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone()
    return "timescaledb" if row else "postgresql"


def enable_timescaledb(conn: psycopg.Connection) -> str:
    """Install the extension when the server offers it; returns the resulting mode."""
    if installed_mode(conn) == "timescaledb":
        return "timescaledb"
    offered = conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'").fetchone()
    if offered:
        conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    return installed_mode(conn)


def current_role(conn: psycopg.Connection) -> tuple[str, bool]:
    """The connected role and whether it is a superuser."""
    name, sup = conn.execute("SELECT rolname, rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
    return name, sup


def migrate(database_url: str) -> list[str]:
    """Apply pending migrations; returns the versions applied now."""
    applied_now = []
    with psycopg.connect(database_url, autocommit=True) as conn:
        role, superuser = current_role(conn)
        if superuser:
            log.warning(
                "migrating as the superuser %s: what the migrations create belongs to a superuser; "
                "run them as the owner role (PILOTLAB_DATABASE_OWNER_URL)",
                role,
            )
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_ID,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version text PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            conn.execute("ALTER TABLE schema_migrations ADD COLUMN IF NOT EXISTS mode text NOT NULL DEFAULT ''")
            mode = enable_timescaledb(conn)
            done = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
            for m in available(mode):
                if m.version in done:
                    continue
                with conn.transaction():
                    conn.execute(m.sql)
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name, mode) VALUES (%s, %s, %s)",
                        (m.version, m.name, m.mode),
                    )
                applied_now.append(m.version)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_ID,))
    return applied_now


def status(database_url: str) -> dict:
    """The database mode, the connected role and the migrations applied / pending (for
    ``pilotlab db status``)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        role, superuser = current_role(conn)
        mode = installed_mode(conn)
        table = conn.execute("SELECT to_regclass('schema_migrations')").fetchone()[0]
        done = [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY version")] if table else []
    pending = [m.version for m in available(mode) if m.version not in done]
    return {"mode": mode, "role": role, "superuser": superuser, "applied": done, "pending": pending}
