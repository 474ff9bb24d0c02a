"""Per-startup access, enforced by the database (docs/access.md; migrations 0030/0031/0044).

The interface (what the portal and the CLI call)::

    grant(conn, startup: str | None, label: str = "", *, sql: bool = False) -> Grant
        A new token for a startup (its role startup_<slug> made when missing) or, startup None,
        for the lab. Grant.token is shown once and stored only hashed. sql=True: the startup's
        role may log in with Grant.sql_password (a fresh one; the previous SQL grant of that
        startup stops working). ``conn``: the owner's (PILOTLAB_DATABASE_OWNER_URL).
    revoke(conn, token_id: str) -> GrantRow | None
        Revoke now; None when there is no such active token. Revoking the startup's SQL grant
        takes the role's login away and ends its sessions. ``conn``: the owner's.
    list_grants(conn) -> list[GrantRow]
        Every token ever granted, newest first, no secret in them. ``conn``: the owner's.
    authenticate(conn, token: str) -> Principal | None
        Who a presented token is; None for a malformed, unknown or revoked one (hash compared
        in constant time). ``conn``: grafana_reader's (PILOTLAB_DATABASE_READER_URL) or the owner's.
    scoped(conn, principal: Principal) -> ContextManager[psycopg.Connection]
        A transaction in which every query runs as the principal: for a startup, SET LOCAL ROLE
        to its role and its search_path, so the database's row-level security (TimescaleDB
        mode: the views of migration 0044 for the time series) returns its rows only (whatever
        the SQL says); for the lab, no switch. ``conn`` must be idle (not inside a transaction; a
        SET LOCAL in a savepoint would outlive the block) and connected as grafana_reader (a
        member of every startup role) or the owner for the lab.
    sql_url(database_url, role, password) -> str          the startup's own postgresql:// URL
    grafana_datasource(...) -> str                        Grafana provisioning YAML for it

Tokens are ``plt_<token_id>_<secret>``: 16 hex characters naming the row and a 32-byte secret
(secrets.token_urlsafe). Only SHA-256 of the whole token is stored: with 256 random bits a
slow, salted hash (scrypt, argon2) protects nothing more, while costing every API request.
The startup's SQL password reaches PostgreSQL as a SCRAM-SHA-256 verifier computed here, never
as plaintext (which the server could log).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import quote, urlencode

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus
from psycopg.rows import class_row

TOKEN_PREFIX = "plt"
GROUP_ROLE = "pilotlab_startups"
ROLE_PREFIX = "startup_"
_ROLE_RE = re.compile(r"^startup_[a-z0-9_]{1,55}$")  # what roles.sql's functions accept
# a startup role's search_path (roles.sql sets the same on its login): in TimescaleDB mode,
# schema pilotlab_startup holds views of the time series with its own rows (migration 0044)
STARTUP_SEARCH_PATH = "SET LOCAL search_path = pilotlab_startup, public"
_TOKEN_RE = re.compile(r"^plt_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
_SLUG_MAX = 40  # startup_ + 40 + _ + 6 hex = 55 characters, under PostgreSQL's 63
SCRAM_ITERATIONS = 4096  # PostgreSQL's default (scram_iterations)


class AccessError(Exception):
    """A grant or revoke that cannot be done (unknown token, invalid startup name, ...)."""


@dataclass(frozen=True)
class Grant:
    """What ``grant`` returns: the token, to show once. sql_password: only for a SQL grant."""

    token_id: str
    token: str
    startup: str | None
    role: str | None
    label: str
    sql_password: str | None = None


@dataclass(frozen=True)
class GrantRow:
    """One token as stored (no secret): ``list_grants``, ``revoke``."""

    token_id: str
    startup: str | None
    role: str | None
    label: str
    sql_login: bool
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True)
class Principal:
    """Who a token is: the lab (startup None, sees every pilot) or one startup."""

    token_id: str
    startup: str | None
    role: str | None
    label: str

    @property
    def is_lab(self) -> bool:
        return self.startup is None


# --- pure parts ----------------------------------------------------------------------------


def new_token() -> tuple[str, str]:
    """(token_id, token): a fresh random token and the id it carries."""
    token_id = secrets.token_hex(8)
    return token_id, f"{TOKEN_PREFIX}_{token_id}_{secrets.token_urlsafe(32)}"


def parse_token(token: str) -> str | None:
    """The token id of a well-formed token, else None."""
    m = _TOKEN_RE.fullmatch(token) if isinstance(token, str) else None
    return m.group(1) if m else None


def token_hash(token: str) -> bytes:
    """What is stored of a token: SHA-256 of all of it (32 bytes)."""
    return hashlib.sha256(token.encode("utf-8")).digest()


def role_name(startup: str) -> str:
    """The database role of a startup: ``startup_<slug>``, the slug being the name in lower
    case with every run of other characters turned into ``_``. A name that is not already its
    own slug gets 6 hex digits of its SHA-256 appended, so "Air Sense" and "air-sense" (or two
    names cut to the same 40 characters) never share a role. Raises ValueError for a name with
    no letter or digit."""
    if not isinstance(startup, str) or not startup.strip():
        raise ValueError("a startup name is required")
    slug = re.sub(r"[^a-z0-9]+", "_", startup.lower()).strip("_")
    if not slug:
        raise ValueError(f"startup name {startup!r} has no letter or digit to name a role after")
    if slug == startup and len(slug) <= _SLUG_MAX:
        name = ROLE_PREFIX + slug
    else:
        digest = hashlib.sha256(startup.encode("utf-8")).hexdigest()[:6]
        name = f"{ROLE_PREFIX}{slug[:_SLUG_MAX].rstrip('_')}_{digest}"
    assert _ROLE_RE.fullmatch(name), name
    return name


def scram_verifier(password: str, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for ``password`` (RFC 5802/7677; the format
    of pg_authid.rolpassword), so that the password itself never reaches the server. The
    password is used as is (pilotlab's are ASCII, where SASLprep changes nothing)."""
    if not password.isascii():
        raise ValueError("only ASCII passwords (SASLprep is not implemented)")
    salt = salt if salt is not None else secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    stored_key = hashlib.sha256(hmac.new(salted, b"Client Key", "sha256").digest()).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()

    def b64(b: bytes) -> str:
        return base64.b64encode(b).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def sql_url(database_url: str, role: str, password: str) -> str:
    """``database_url`` (any role's) with the startup's role and password in it."""
    params = conninfo_to_dict(database_url)
    params.update(user=role, password=password)
    params.pop("passfile", None)
    host, port, dbname = params.pop("host", "127.0.0.1"), params.pop("port", "5432"), params.pop("dbname", "")
    query = urlencode({k: v for k, v in params.items() if k not in ("user", "password")})
    auth = f"{quote(role, safe='')}:{quote(password, safe='')}"
    url = f"postgresql://{auth}@{host}:{port}/{quote(dbname, safe='')}"
    return f"{url}?{query}" if query else url


def grafana_datasource(
    database_url: str, role: str, startup: str, *, password: str | None = None, timescaledb: bool = False
) -> str:
    """Grafana provisioning YAML for a datasource that reads as the startup's role (the
    password from ``$PILOTLAB_STARTUP_DB_PASSWORD`` when not given). Grafana sees what the
    role sees: that startup's rows only."""
    p = conninfo_to_dict(database_url)
    host, port, dbname = p.get("host", "127.0.0.1"), p.get("port", "5432"), p.get("dbname", "pilotlab")
    uid = "pilotlab-" + role.replace("_", "-")
    secret = json.dumps(password) if password is not None else "${PILOTLAB_STARTUP_DB_PASSWORD}"
    return (
        "apiVersion: 1\n"
        "datasources:\n"
        f"  - name: {json.dumps(f'pilotlab ({startup})')}\n"
        f"    uid: {uid}\n"
        "    type: grafana-postgresql-datasource\n"
        "    access: proxy\n"
        f"    url: {json.dumps(f'{host}:{port}')}\n"
        f"    user: {role}\n"
        "    editable: false\n"
        "    jsonData:\n"
        f"      database: {json.dumps(dbname)}\n"
        "      sslmode: disable\n"
        "      postgresVersion: 1500\n"
        f"      timescaledb: {'true' if timescaledb else 'false'}\n"
        "      maxOpenConns: 2\n"
        "    secureJsonData:\n"
        f"      password: {secret}\n"
    )


# --- the database ----------------------------------------------------------------------------

_GRANT_ROWS = sql.SQL(
    "SELECT t.token_id, t.startup, s.role, t.label, t.sql_login, t.created_at, t.revoked_at"
    "  FROM access_tokens t LEFT JOIN startup_roles s USING (startup)"
)


def _startup_role(conn: psycopg.Connection, startup: str) -> str:
    """The role of ``startup``, recorded (and created) on its first grant."""
    row = conn.execute("SELECT role FROM startup_roles WHERE startup = %s", (startup,)).fetchone()
    if row:
        role = row[0]
    else:
        role = role_name(startup)
        taken = conn.execute("SELECT startup FROM startup_roles WHERE role = %s", (role,)).fetchone()
        if taken:
            raise AccessError(f"role {role} already belongs to startup {taken[0]!r}")
        conn.execute("INSERT INTO startup_roles (startup, role) VALUES (%s, %s)", (startup, role))
    conn.execute("SELECT pilotlab_admin.ensure_startup_role(%s)", (role,))
    return role


def grant(conn: psycopg.Connection, startup: str | None, label: str = "", *, sql: bool = False) -> Grant:
    """A new token (see the module's docstring). One transaction."""
    if sql and startup is None:
        raise AccessError("SQL access is per startup; the lab has its own roles")
    token_id, token = new_token()
    password = None
    with conn.transaction():
        role = _startup_role(conn, startup) if startup is not None else None
        if sql:
            password = secrets.token_urlsafe(32)
            conn.execute(
                "UPDATE access_tokens SET sql_login = false WHERE startup = %s AND sql_login AND revoked_at IS NULL",
                (startup,),
            )
            conn.execute("SELECT pilotlab_admin.set_startup_login(%s, %s)", (role, scram_verifier(password)))
        conn.execute(
            "INSERT INTO access_tokens (token_id, startup, token_hash, label, sql_login) VALUES (%s, %s, %s, %s, %s)",
            (token_id, startup, token_hash(token), label, sql),
        )
    return Grant(token_id, token, startup, role, label, password)


def revoke(conn: psycopg.Connection, token_id: str) -> GrantRow | None:
    """Revoke an active token now (see the module's docstring)."""
    with conn.transaction():
        row = conn.execute(
            "UPDATE access_tokens SET revoked_at = now() WHERE token_id = %s AND revoked_at IS NULL RETURNING token_id",
            (token_id,),
        ).fetchone()
        if row is None:
            return None
        with conn.cursor(row_factory=class_row(GrantRow)) as cur:
            revoked = cur.execute(_GRANT_ROWS + sql.SQL(" WHERE t.token_id = %s"), (token_id,)).fetchone()
        if revoked.sql_login:
            conn.execute("SELECT pilotlab_admin.set_startup_login(%s, NULL)", (revoked.role,))
    if revoked.sql_login:
        # once more now that NOLOGIN is committed: a session opened in between ends too
        conn.execute("SELECT pilotlab_admin.set_startup_login(%s, NULL)", (revoked.role,))
        if not conn.autocommit:
            conn.commit()
    return revoked


def list_grants(conn: psycopg.Connection) -> list[GrantRow]:
    with conn.cursor(row_factory=class_row(GrantRow)) as cur:
        return cur.execute(_GRANT_ROWS + sql.SQL(" ORDER BY t.created_at DESC, t.token_id")).fetchall()


def authenticate(conn: psycopg.Connection, token: str) -> Principal | None:
    """The principal of an active token, else None (see the module's docstring)."""
    presented = token_hash(token if isinstance(token, str) else "")
    token_id = parse_token(token)
    if token_id is None:
        return None
    idle = conn.info.transaction_status == TransactionStatus.IDLE
    row = conn.execute(
        "SELECT t.token_hash, t.startup, s.role, t.label, t.revoked_at"
        "  FROM access_tokens t LEFT JOIN startup_roles s USING (startup) WHERE t.token_id = %s",
        (token_id,),
    ).fetchone()
    if idle and conn.info.transaction_status == TransactionStatus.INTRANS:
        conn.rollback()  # the transaction this read opened: the connection is left idle, as found
    stored = bytes(row[0]) if row else bytes(32)
    if not hmac.compare_digest(stored, presented) or row is None or row[4] is not None:
        return None
    if row[1] is not None and row[2] is None:
        return None  # a startup token whose role mapping is gone: nobody
    return Principal(token_id, row[1], row[2], row[3])


@contextmanager
def scoped(conn: psycopg.Connection, principal: Principal) -> Iterator[psycopg.Connection]:
    """Run the block in a transaction as ``principal`` (see the module's docstring)."""
    if conn.info.transaction_status != TransactionStatus.IDLE:
        raise AccessError("scoped() needs an idle connection (a transaction is open)")
    with conn.transaction():
        if not principal.is_lab:
            if principal.role is None or not _ROLE_RE.fullmatch(principal.role):
                raise AccessError(f"not a startup role: {principal.role!r}")
            conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(principal.role)))
            # a role's own settings apply at login, not on SET ROLE: its search_path too, which
            # reads the time series through the per-startup views in TimescaleDB mode (0044)
            conn.execute(STARTUP_SEARCH_PATH)
            acting = conn.execute("SELECT pilotlab_current_startup()").fetchone()[0]
            if acting != principal.startup:
                raise AccessError(f"role {principal.role} acts for {acting!r}, not {principal.startup!r}")
        yield conn
