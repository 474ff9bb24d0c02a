"""Least privilege in the database, on PostgreSQL 15 (docs/operations.md, "Database roles and
privileges"): the embedded stack's roles and passwords, what each role holds and is refused,
what a role can and cannot change about itself (including what PostgreSQL lets it change),
docker-compose's initdb script on a cluster set up like the image's, and clusters from before
the roles (the embedded stack's and docker-compose's) brought up to them."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from control.stack import (
    PASSWORDS_FILE,
    Stack,
    StackState,
    find_postgres_bindir,
    free_port,
    port_answers,
    postgres_admin_connect,
    postgres_bootstrap,
    postgres_passwords,
)
from storage import roles, writer
from storage.migrate import available, migrate, status
from storage.roles import OWNER, READER, WRITER, WRITER_PRIVILEGES
from tests.timescale.data import build, load

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
INIT_SCRIPT = REPO / "deploy" / "timescaledb" / "initdb" / "10-pilotlab-roles.sh"
TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")
Refused = psycopg.errors.InsufficientPrivilege
RELATIONS = (
    "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'p', 'v', 'm')"
)


@pytest.fixture(autouse=True)
def _no_ambient_password(monkeypatch):
    """Only what a URL carries counts: no PGPASSWORD, no ~/.pgpass."""
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", "/nonexistent")


def _connect(url: str, **kw) -> psycopg.Connection:
    return psycopg.connect(make_conninfo(url, **kw), autocommit=True, connect_timeout=5)


def _without_password(url: str) -> str:
    params = conninfo_to_dict(url)
    params.pop("password", None)
    return make_conninfo(**params)


def _user(url: str) -> str:
    return conninfo_to_dict(url)["user"]


def _refused(conn: psycopg.Connection, sql: str, error: type[Exception] = Refused) -> None:
    with pytest.raises(error):
        conn.execute(sql)


# --- the embedded stack -------------------------------------------------------------------------


def test_each_service_gets_its_own_role_with_a_password_kept_0600(stack_state: StackState):
    env = stack_state.env()
    assert _user(env["PILOTLAB_DATABASE_URL"]) == WRITER  # the sink
    assert _user(env["PILOTLAB_DATABASE_OWNER_URL"]) == OWNER  # db migrate
    assert _user(env["PILOTLAB_DATABASE_READER_URL"]) == READER  # report, plan
    assert stack_state.database_url == stack_state.owner_url  # tests and tools set up as the owner
    passwords = postgres_passwords(Path(stack_state.data_dir))
    for role, url in (
        (WRITER, stack_state.writer_url),
        (OWNER, stack_state.owner_url),
        (READER, stack_state.reader_url),
    ):
        assert conninfo_to_dict(url)["password"] == passwords[role]
        with _connect(url) as conn:
            who = conn.execute("SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
            assert who == (role, False)
    assert len(set(passwords.values())) == 3 and all(len(p) >= 24 for p in passwords.values())
    path = Path(stack_state.data_dir) / PASSWORDS_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # the passwords are in that file only, not in state.json
    state_json = (Path(stack_state.data_dir) / "state.json").read_text()
    assert not any(p in state_json for p in passwords.values())


def test_tcp_takes_only_scram_passwords_and_the_superuser_only_the_socket(stack_state: StackState):
    for url in (stack_state.owner_url, stack_state.writer_url, stack_state.reader_url):
        with pytest.raises(psycopg.OperationalError, match="no password supplied"):
            _connect(_without_password(url))
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            _connect(url, password="not-the-password")
    for superuser in ("postgres", "pilotlab"):  # the superuser has no password: no way in over TCP
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            _connect(stack_state.owner_url, user=superuser, password="guess")
    root = Path(stack_state.postgres_data)
    assert stat.S_IMODE((root / "run").stat().st_mode) == 0o700  # the socket: the cluster's OS user only
    with postgres_admin_connect(stack_state) as admin:
        rules = admin.execute(
            "SELECT type, user_name, auth_method FROM pg_hba_file_rules WHERE error IS NULL"
        ).fetchall()
        assert rules == [
            ("local", ["postgres"], "trust"),
            ("host", ["all"], "scram-sha-256"),
            ("host", ["all"], "scram-sha-256"),
        ]
        stored = dict(
            admin.execute("SELECT rolname, rolpassword FROM pg_authid WHERE rolname = ANY(%s)", (list(roles.ROLES),))
        )
        assert all(v.startswith("SCRAM-SHA-256$") for v in stored.values()) and len(stored) == 3


def test_no_role_is_a_superuser_or_a_member_of_anything(stack_state: StackState):
    with postgres_admin_connect(stack_state) as admin:
        attrs = {
            r[0]: r[1:]
            for r in admin.execute(
                "SELECT rolname, rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls, rolcanlogin,"
                " rolconnlimit FROM pg_roles WHERE rolname = ANY(%s)",
                (list(roles.ROLES),),
            )
        }
        # (super, createrole, createdb, replication, bypassrls, login, connection limit); only the
        # embedded stack's owner may create (scratch) databases: benchmarks and tests use them
        assert attrs == {
            OWNER: (False, False, True, False, False, True, -1),
            WRITER: (False, False, False, False, False, True, 20),
            READER: (False, False, False, False, False, True, 20),
        }
        members = admin.execute(
            "SELECT m.member::regrole::text, m.roleid::regrole::text FROM pg_auth_members m"
            " JOIN pg_roles r ON r.oid = m.member WHERE r.rolname = ANY(%s)",
            (list(roles.ROLES),),
        ).fetchall()
        assert members == []


def test_migrations_run_as_the_owner_who_owns_everything(stack_state: StackState):
    assert migrate(stack_state.owner_url) == []
    st = status(stack_state.owner_url)
    assert (st["role"], st["superuser"], st["pending"]) == (OWNER, False, [])
    with _connect(stack_state.owner_url) as conn:
        assert (
            conn.execute(
                "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()"
            ).fetchone()[0]
            == OWNER
        )
        owners = conn.execute(
            "SELECT c.relname, pg_get_userbyid(c.relowner) FROM pg_class c"
            " WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')"
            " UNION ALL SELECT p.proname, pg_get_userbyid(p.proowner) FROM pg_proc p"
            " WHERE p.pronamespace = 'public'::regnamespace"
        ).fetchall()
        assert len(owners) > 20 and {o for _, o in owners} == {OWNER}, [x for x in owners if x[1] != OWNER]
    # the sink's role cannot migrate: it may create nothing
    with pytest.raises(Refused):
        migrate(stack_state.writer_url)


def test_db_migrate_uses_the_owner_url_and_never_the_sinks(stack_state: StackState):
    def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "control", "db", *args],
            env={"PATH": os.environ["PATH"], "PGPASSFILE": "/nonexistent", **env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    env = stack_state.env()
    ok = cli("migrate", PILOTLAB_DATABASE_OWNER_URL=env["PILOTLAB_DATABASE_OWNER_URL"])
    assert ok.returncode == 0 and "schema is up to date" in ok.stdout, ok.stderr
    st = cli("status", PILOTLAB_DATABASE_OWNER_URL=env["PILOTLAB_DATABASE_OWNER_URL"])
    assert f"role: {OWNER}\n" in st.stdout
    missing = cli("migrate", PILOTLAB_DATABASE_URL=env["PILOTLAB_DATABASE_URL"])  # no fallback to the writer
    assert missing.returncode != 0 and "PILOTLAB_DATABASE_OWNER_URL" in missing.stderr


def _privileges(conn: psycopg.Connection, role: str) -> dict[str, set[str]]:
    tables = [r[0] for r in conn.execute(RELATIONS)]
    held = {}
    for t in tables:
        privs = {
            p
            for p in TABLE_PRIVILEGES
            if conn.execute("SELECT has_table_privilege(%s, %s, %s)", (role, f"public.{t}", p)).fetchone()[0]
        }
        if privs:
            held[t] = privs
    return held


def test_the_writer_holds_the_sinks_privileges_and_the_reader_select_only(stack_state: StackState):
    with _connect(stack_state.owner_url) as conn:
        assert _privileges(conn, WRITER) == WRITER_PRIVILEGES
        tables = conn.execute(RELATIONS).fetchall()
        assert _privileges(conn, READER) == {t: {"SELECT"} for (t,) in tables}

        def db(role: str, priv: str) -> bool:
            return conn.execute("SELECT has_database_privilege(%s, current_database(), %s)", (role, priv)).fetchone()[0]

        def schema(role: str, priv: str) -> bool:
            return conn.execute("SELECT has_schema_privilege(%s, 'public', %s)", (role, priv)).fetchone()[0]

        # CONNECT for both; TEMP for the writer's COPY staging table only; CREATE for neither
        assert [db(WRITER, p) for p in ("CONNECT", "TEMPORARY", "CREATE")] == [True, True, False]
        assert [db(READER, p) for p in ("CONNECT", "TEMPORARY", "CREATE")] == [True, False, False]
        assert [db("public", p) for p in ("CONNECT", "TEMPORARY", "CREATE")] == [False, False, False]
        assert [schema(r, "CREATE") for r in (WRITER, READER, "public")] == [False, False, False]
        # retention deletes rows: the owner's function alone
        assert not conn.execute(
            "SELECT has_function_privilege(%s, 'apply_retention()', 'EXECUTE')", (WRITER,)
        ).fetchone()[0]


def test_the_sink_writes_as_the_writer_and_can_do_nothing_else(stack_state: StackState):
    ds = build("priv")
    with _connect(stack_state.writer_url) as conn:
        # the sink's own write paths: COPY + merge into readings (a TEMP staging table), upserts
        written = load(conn, ds)
        assert written["readings"] == len(ds.rows())
        with conn.transaction():
            assert writer.write_late_readings(conn, ds.batches[:1]) > 0
            newer = [dataclasses.replace(k, value=k.value + 1, revision=k.revision + 1) for k in ds.kpis]
            assert writer.write_kpis(conn, newer) == len(newer)  # UPDATE of kpi_values
            fewer = ds.experiment.model_copy(update={"devices": ds.experiment.devices[:2]})
            writer.write_experiments(conn, [fewer])  # UPDATE experiments, DELETE the dropped device
        assert (
            conn.execute("SELECT count(*) FROM devices WHERE experiment_id = %s", (ds.experiment.id,)).fetchone()[0]
            == 2
        )

        for sql in (
            "DELETE FROM readings",
            "UPDATE readings SET value = 0",
            "TRUNCATE readings",
            "DELETE FROM kpi_values",
            "DELETE FROM rejections",
            "DROP TABLE readings",
            "ALTER TABLE readings ADD COLUMN x int",
            "CREATE INDEX ON readings (value)",
            "CREATE TABLE mine (a int)",
            "CREATE VIEW mine AS SELECT 1",
            "CREATE FUNCTION public.mine() RETURNS int LANGUAGE sql AS 'SELECT 1'",
            "CREATE SCHEMA mine",
            "SELECT apply_retention()",
            "SELECT lo_create(0)",
            "SELECT lo_from_bytea(0, 'x')",
            "INSERT INTO schema_migrations (version, name) VALUES ('9999', 'x')",
            "SELECT * FROM schema_migrations",
        ):
            _refused(conn, sql)
        # granting itself more: a warning, and nothing granted
        conn.execute("GRANT DELETE ON readings TO pilotlab_writer")
        assert not conn.execute("SELECT has_table_privilege('readings', 'DELETE')").fetchone()[0]
        # what it may create: temporary tables, gone with its session (the COPY staging table)
        conn.execute("CREATE TEMP TABLE scratch (a int)")
    with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
        _connect(stack_state.writer_url, dbname="postgres")
    with _connect(stack_state.owner_url) as conn:
        assert conn.execute("SELECT count(*) FROM readings WHERE experiment_id = %s", (ds.experiment.id,)).fetchone()[
            0
        ] == len(ds.rows())


def test_the_reader_reads_and_creates_nothing_even_out_of_read_only_mode(stack_state: StackState):
    with _connect(stack_state.reader_url) as conn:
        for (t,) in conn.execute(
            "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'v', 'm')"
        ).fetchall():
            conn.execute(f'SELECT count(*) FROM "{t}"')
        conn.execute("SELECT * FROM rejections_by_reason(NULL)").fetchall()
        _refused(conn, "DELETE FROM readings", psycopg.errors.ReadOnlySqlTransaction)
        # the read-only default is the role's to lift; it buys nothing
        conn.execute("SET default_transaction_read_only = off")
        for sql in (
            "INSERT INTO experiments (experiment_id) VALUES ('x')",
            "UPDATE kpi_values SET value = 0",
            "DELETE FROM readings",
            "TRUNCATE rejections",
            "CREATE TABLE mine (a int)",
            "CREATE TEMP TABLE mine (a int)",
            "CREATE TEMP VIEW mine AS SELECT 1",
            "CREATE FUNCTION public.mine() RETURNS int LANGUAGE sql AS 'SELECT 1'",
            "CREATE SCHEMA mine",
            "SELECT lo_create(0)",
            "SELECT lo_creat(-1)",
            "SELECT lo_from_bytea(0, 'x')",
            "SELECT apply_retention()",
        ):
            _refused(conn, sql)
        with pytest.raises(Refused), conn.cursor().copy("COPY readings (ts) FROM STDIN") as cp:
            cp.write_row(("2026-01-01T00:00:00Z",))
    with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
        _connect(stack_state.reader_url, dbname="postgres")


def test_what_a_role_can_and_cannot_change_about_itself(stack_state: StackState):
    """PostgreSQL lets every role change its own session defaults (SET, and ALTER ROLE itself
    SET/RESET for settings any user may set) and its own password; nothing prevents that. What
    a role cannot change: superuser-only settings (temp_file_limit), its attributes and
    connection limit, its memberships, its privileges, the database's settings."""
    passwords = postgres_passwords(Path(stack_state.data_dir))
    try:
        with _connect(stack_state.reader_url) as conn:
            assert conn.execute("SHOW temp_file_limit").fetchone()[0] == "1GB"
            conn.execute("SET default_transaction_read_only = off")
            for sql in (
                "SET temp_file_limit = -1",
                "RESET temp_file_limit",
                "ALTER ROLE grafana_reader SET temp_file_limit = -1",
                "ALTER ROLE grafana_reader RESET temp_file_limit",
                "ALTER ROLE grafana_reader CONNECTION LIMIT -1",
                "ALTER ROLE grafana_reader CREATEDB",
                "ALTER ROLE grafana_reader CREATEROLE",
                "ALTER ROLE grafana_reader SUPERUSER",
                "ALTER ROLE grafana_reader BYPASSRLS",
                "ALTER ROLE grafana_reader VALID UNTIL 'infinity'",
                "GRANT pg_read_all_data TO grafana_reader",
                "GRANT pg_write_all_data TO grafana_reader",
                "GRANT pilotlab_writer TO grafana_reader",
                "ALTER DATABASE pilotlab SET default_transaction_read_only = off",
                "ALTER ROLE pilotlab_writer SET statement_timeout = 0",
            ):
                _refused(conn, sql)
            conn.execute("GRANT INSERT ON readings TO grafana_reader")  # a warning; nothing granted
            assert not conn.execute("SELECT has_table_privilege('readings', 'INSERT')").fetchone()[0]

            # what PostgreSQL allows any role: lift its own USERSET defaults, for good
            conn.execute("SET statement_timeout = 0")
            conn.execute("ALTER ROLE grafana_reader SET statement_timeout = 0")
            conn.execute("ALTER ROLE grafana_reader SET default_transaction_read_only = off")
            conn.execute("ALTER ROLE grafana_reader RESET ALL")  # keeps temp_file_limit: a superuser's
        with _connect(stack_state.reader_url) as conn:
            assert conn.execute("SHOW statement_timeout").fetchone()[0] == "0"
            assert conn.execute("SHOW default_transaction_read_only").fetchone()[0] == "off"
            assert conn.execute("SHOW temp_file_limit").fetchone()[0] == "1GB"
            _refused(conn, "DELETE FROM readings")  # and still writes nothing
            _refused(conn, "CREATE TEMP TABLE mine (a int)")
            # ... and change its own password (Grafana is then locked out: an outage, not an escalation)
            conn.execute("ALTER ROLE grafana_reader PASSWORD 'changed-by-itself'")
        with _connect(stack_state.reader_url, password="changed-by-itself"):
            pass

        with _connect(stack_state.writer_url) as conn:
            for sql in (
                "ALTER ROLE pilotlab_writer CONNECTION LIMIT -1",
                "ALTER ROLE pilotlab_writer CREATEDB",
                "GRANT pg_write_all_data TO pilotlab_writer",
                "GRANT pilotlab_owner TO pilotlab_writer",
                "ALTER ROLE pilotlab_owner PASSWORD 'x'",
            ):
                _refused(conn, sql)
    finally:
        # what `pilotlab stack up` does at every start: the defaults and the passwords come back
        with postgres_admin_connect(stack_state) as admin:
            admin.execute("ALTER ROLE grafana_reader RESET ALL")
            postgres_bootstrap(admin, passwords)
    with _connect(stack_state.reader_url) as conn:
        assert conn.execute("SHOW statement_timeout").fetchone()[0] == "30s"


def test_the_connection_limit_holds(stack_state: StackState):
    with contextlib.ExitStack() as held:
        for _ in range(20):
            held.enter_context(_connect(stack_state.reader_url))
        with pytest.raises(psycopg.OperationalError, match="too many connections for role"):
            _connect(stack_state.reader_url)


def test_roles_sql_needs_a_superuser(stack_state: StackState):
    with _connect(stack_state.owner_url) as conn, pytest.raises(psycopg.errors.RaiseException, match="superuser"):
        roles.bootstrap(conn)


# --- clusters made outside the embedded stack ------------------------------------------------------


@pytest.fixture
def pg_root(tmp_path: Path):
    """A directory the OS user running PostgreSQL can reach (as root: postgres, not through
    pytest's 0700 temporary directories)."""
    if os.getuid() != 0:
        yield tmp_path
        return
    root = Path(tempfile.mkdtemp(prefix="pilotlab-pgtest-"))
    os.chmod(root, 0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


class Cluster:
    """A throwaway PostgreSQL 15 cluster, run by the OS user the embedded stack would use.
    ``password``: the superuser's (``initdb --pwfile``); None: none, and trust for everyone
    (how the embedded stack initialised its clusters before the roles)."""

    def __init__(self, root: Path, superuser: str, password: str | None) -> None:
        self.bindir = find_postgres_bindir()
        if self.bindir is None:
            pytest.skip("no PostgreSQL server binaries")
        self.user = Stack(root)._postgres_user()
        self.root, self.superuser = root, superuser
        self.pgdata, self.sock, self.port = root / "data", root / "run", free_port()
        self.sock.mkdir(parents=True)
        if self.user:
            subprocess.run(["chown", "-R", self.user, str(root)], check=True)
        auth = ["--auth=trust"]
        if password is not None:
            pwfile = root / "pw"
            pwfile.write_text(password + "\n")
            os.chmod(pwfile, 0o644)
            auth = [f"--pwfile={pwfile}"]
        self._run("initdb", "-D", str(self.pgdata), "-U", superuser, *auth, "-E", "UTF8", "--locale=C")
        with contextlib.suppress(FileNotFoundError):
            (root / "pw").unlink()

    def _run(self, program: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        res = subprocess.run(
            [str(self.bindir / program), *args], user=self.user, capture_output=True, text=True, check=False, env=env
        )
        assert res.returncode == 0, f"{program}: {res.stderr}"
        return res

    def start(self, tcp: bool) -> None:
        listen = "127.0.0.1" if tcp else "''"
        self._run(
            "pg_ctl",
            "-D",
            str(self.pgdata),
            "-w",
            "-l",
            str(self.root / "log"),
            "-o",
            f"-p {self.port} -k {self.sock} -c listen_addresses={listen}",
            "start",
        )
        if tcp:
            deadline = time.monotonic() + 10
            while not port_answers(self.port):
                assert time.monotonic() < deadline
                time.sleep(0.1)

    def stop(self) -> None:
        subprocess.run(
            [str(self.bindir / "pg_ctl"), "-D", str(self.pgdata), "-m", "fast", "-w", "stop"],
            user=self.user,
            capture_output=True,
            check=False,
        )

    def socket(self, dbname: str = "pilotlab") -> psycopg.Connection:
        return psycopg.connect(host=str(self.sock), port=self.port, user=self.superuser, dbname=dbname, autocommit=True)

    def url(self, user: str, password: str) -> str:
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/pilotlab"

    def run_init_script(self, **env: str) -> None:
        """deploy/timescaledb/initdb/10-pilotlab-roles.sh as the image's entrypoint runs it."""
        res = subprocess.run(
            ["sh", str(INIT_SCRIPT)],
            user=self.user,
            env={
                "PATH": f"{self.bindir}:/usr/bin:/bin",
                "PGHOST": str(self.sock),
                "PGPORT": str(self.port),
                "PGDATA": str(self.pgdata),
                "POSTGRES_DB": "pilotlab",
                "PILOTLAB_ROLES_SQL": str(REPO / "storage" / "roles.sql"),
                **env,
            },
            capture_output=True,
            text=True,
            check=False,
        )
        assert res.returncode == 0, res.stderr
        assert "pilotlab-owner-pw" not in res.stdout + res.stderr


COMPOSE_PASSWORDS = {
    "PILOTLAB_DB_OWNER_PASSWORD": "pilotlab-owner-pw",
    "PILOTLAB_DB_WRITER_PASSWORD": "pilotlab-writer-pw",
    "GRAFANA_DB_PASSWORD": "grafana-reader-pw",
}


def _check_compose_roles(c: Cluster, superuser_password: str, expected_applied: list[str]) -> None:
    with pytest.raises(psycopg.OperationalError, match="rejects connection"):
        _connect(c.url(c.superuser, superuser_password))  # the superuser: inside the container only
    owner = c.url(OWNER, "pilotlab-owner-pw")
    assert migrate(owner) == expected_applied
    with _connect(owner) as conn:
        assert _privileges(conn, WRITER) == WRITER_PRIVILEGES
        assert not conn.execute("SELECT rolcreatedb FROM pg_roles WHERE rolname = current_user").fetchone()[0]
        owners = conn.execute(
            "SELECT DISTINCT pg_get_userbyid(relowner) FROM pg_class WHERE relnamespace = 'public'::regnamespace"
            " UNION SELECT DISTINCT pg_get_userbyid(proowner) FROM pg_proc"
            " WHERE pronamespace = 'public'::regnamespace"
        ).fetchall()
        assert owners == [(OWNER,)]
    ds = build("compose")
    with _connect(c.url(WRITER, "pilotlab-writer-pw")) as conn:
        assert load(conn, ds)["readings"] == len(ds.rows())
    with _connect(c.url(READER, "grafana-reader-pw")) as conn:
        assert conn.execute("SELECT count(*) FROM readings").fetchone()[0] >= len(ds.rows())
        assert conn.execute("SHOW default_transaction_read_only").fetchone()[0] == "on"
        assert not conn.execute("SELECT pg_has_role('pg_read_all_data', 'MEMBER')").fetchone()[0]
        conn.execute("SET default_transaction_read_only = off")
        _refused(conn, "CREATE TEMP TABLE mine (a int)")
    for user in (OWNER, WRITER, READER):
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            _connect(c.url(user, "wrong"))


def test_compose_initdb_script_on_a_fresh_volume(pg_root: Path):
    """The image's first start: initdb with POSTGRES_USER=postgres and its password, a host line
    for passwords, a socket-only server running the initdb scripts with POSTGRES_DB created."""
    c = Cluster(pg_root / "fresh", "postgres", "postgres-pw")
    try:
        with open(c.pgdata / "pg_hba.conf", "a") as fh:
            fh.write("\nhost all all all scram-sha-256\n")  # what the image appends
        c.start(tcp=False)
        with c.socket("postgres") as conn:
            conn.execute("CREATE DATABASE pilotlab")
        c.run_init_script(POSTGRES_USER="postgres", **COMPOSE_PASSWORDS)
        c.stop()
        c.start(tcp=True)
        _check_compose_roles(c, "postgres-pw", [m.version for m in available("postgresql")])
    finally:
        c.stop()


def _since_roles() -> list[str]:
    """The migrations an old database still lacks: 0022 and whatever came after it."""
    return sorted({m.version for m in available("postgresql") if m.version >= "0022"})


def _migrate_as_before(url: str) -> None:
    """What `pilotlab db migrate` did as the superuser: the migrations before 0022."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE schema_migrations (version text PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now(), mode text NOT NULL DEFAULT '')"
        )
        for m in available("postgresql"):
            if m.version < "0022":
                conn.execute(m.sql)
                conn.execute("INSERT INTO schema_migrations VALUES (%s, %s, now(), %s)", (m.version, m.name, m.mode))
        conn.execute("INSERT INTO experiments VALUES ('old', 't', 's', 'd', 0, 0, now(), now(), now(), now(), '{}')")


def test_compose_volume_from_before_the_roles_is_upgraded_by_the_script(pg_root: Path):
    """The old compose volume: superuser `pilotlab` (password `pilotlab`), grafana_reader a member of
    pg_read_all_data, the schema migrated by the superuser. The script, run by hand on the running
    server, hands everything to the owner and closes the superuser's network login."""
    c = Cluster(pg_root / "old", "pilotlab", "pilotlab")
    try:
        with open(c.pgdata / "pg_hba.conf", "a") as fh:
            fh.write("\nhost all all all scram-sha-256\n")
        c.start(tcp=True)
        with c.socket("postgres") as conn:
            conn.execute("CREATE DATABASE pilotlab")
        with c.socket() as conn:  # the old 10-grafana-reader.sh
            conn.execute("CREATE ROLE grafana_reader LOGIN PASSWORD 'old'")
            conn.execute("GRANT pg_read_all_data TO grafana_reader")
        _migrate_as_before(c.url("pilotlab", "pilotlab"))
        c.run_init_script(POSTGRES_USER="pilotlab", **COMPOSE_PASSWORDS)
        _check_compose_roles(c, "pilotlab", _since_roles())
        with _connect(c.url(WRITER, "pilotlab-writer-pw")) as conn:
            assert conn.execute("SELECT count(*) FROM experiments WHERE experiment_id = 'old'").fetchone()[0] == 1
    finally:
        c.stop()


def test_an_embedded_cluster_from_before_the_roles_is_upgraded_by_stack_up(tmp_path: Path):
    """A data dir whose PostgreSQL was initialised with the superuser `pilotlab` and trusted
    everyone: `stack up` rewrites pg_hba.conf, creates the roles, hands the objects to the owner."""
    data = tmp_path / "stack"
    stack = Stack(data, kafka_storage="memory")
    # where `stack up` keeps this data dir's PostgreSQL (outside it when root runs the tests)
    root = stack._postgres_dir(StackState(data_dir=str(stack.data_dir)), stack._postgres_user())
    c = Cluster(root, "pilotlab", None)
    try:
        c.start(tcp=True)
        with c.socket("postgres") as conn:
            conn.execute("CREATE DATABASE pilotlab")
        with c.socket() as conn:
            conn.execute("CREATE ROLE grafana_reader LOGIN")
        _migrate_as_before(make_conninfo(host=str(c.sock), port=c.port, user="pilotlab", dbname="pilotlab"))
    finally:
        c.stop()
    try:
        state = stack.up(ports={"postgres": c.port})
        assert migrate(state.owner_url) == _since_roles()
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            _connect(state.owner_url, user="pilotlab", password="anything")  # the old superuser: socket only
        with _connect(state.owner_url) as conn:
            owners = conn.execute(
                "SELECT DISTINCT pg_get_userbyid(relowner) FROM pg_class WHERE relnamespace = 'public'::regnamespace"
                " UNION SELECT DISTINCT pg_get_userbyid(proowner) FROM pg_proc"
                " WHERE pronamespace = 'public'::regnamespace"
                " UNION SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'pilotlab'"
            ).fetchall()
            assert owners == [(OWNER,)]
            assert _privileges(conn, WRITER) == WRITER_PRIVILEGES
        with _connect(state.writer_url) as conn:
            assert conn.execute("SELECT count(*) FROM experiments WHERE experiment_id = 'old'").fetchone()[0] == 1
        assert json.loads((data / PASSWORDS_FILE).read_text()).keys() == set(roles.ROLES)
    finally:
        stack.down(purge=True)
