"""Versioned SQL migrations: ``storage/migrations/NNNN_name.sql``, applied in order, each in
its own transaction, recorded in ``schema_migrations``. Applying twice changes nothing."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import psycopg

_LOCK_ID = 0x70696C6F  # advisory lock: two migrators never interleave


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    sql: str


def available() -> list[Migration]:
    files = sorted(
        (f for f in resources.files("storage.migrations").iterdir() if f.name.endswith(".sql")),
        key=lambda f: f.name,
    )
    out = []
    for f in files:
        version, _, name = f.name.removesuffix(".sql").partition("_")
        out.append(Migration(version, name, f.read_text(encoding="utf-8")))
    return out


def migrate(database_url: str) -> list[str]:
    """Apply pending migrations; returns the versions applied now."""
    applied_now = []
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_ID,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version text PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
            for m in available():
                if m.version in done:
                    continue
                with conn.transaction():
                    conn.execute(m.sql)
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (m.version, m.name)
                    )
                applied_now.append(m.version)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_ID,))
    return applied_now
