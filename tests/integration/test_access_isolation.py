"""Per-startup isolation enforced by PostgreSQL 15 (docs/access.md; storage/access.py, migrations
0030/0031, storage/roles.sql): two startups, A and B, with experiments, readings, late readings,
KPIs, device status, rejections, alerts and deliveries written as the lab's writer role; A, with
its own SQL login and through the portal's path (authenticate + scoped), reads its rows only —
from every table, view and query function, and not even by B's exact ids — and writes nothing.
The catalog is checked too: every table holding a startup's rows has a startup policy and
everything a startup may read is row-secured, so a table added later cannot leak silently."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import Jsonb

from control.stack import StackState, postgres_admin_connect
from pilotlab.contracts import Reason, Rejection, to_ms
from storage import access, roles, writer
from tests.timescale.data import build, load

pytestmark = pytest.mark.integration

Refused = psycopg.errors.InsufficientPrivilege
STARTUP_A, STARTUP_B = "Acme Air GmbH", "beta"
# tables the lab keeps to itself: row-secured with no startup policy, or no startup data at all
LAB_ONLY = {"alert_state", "alert_offsets", "access_tokens", "schema_migrations"}
# columns that tie a row to an experiment, and so to a startup
STARTUP_KEYS = {"experiment_id", "device_id", "alert_id", "startup", "rejection_id"}


@pytest.fixture(autouse=True)
def _no_ambient_password(monkeypatch):
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", "/nonexistent")


def _connect(url: str) -> psycopg.Connection:
    return psycopg.connect(url, autocommit=True, connect_timeout=5)


@dataclass
class Side:
    startup: str
    experiment_id: str
    device_id: str
    rejection_id: str
    alert_id: str
    grant: access.Grant

    @property
    def url_of(self):  # the startup's own SQL login
        return lambda base: access.sql_url(base, self.grant.role, self.grant.sql_password)


@dataclass
class World:
    state: StackState
    a: Side
    b: Side
    lab: access.Grant


def _side(state: StackState, suffix: str, startup: str) -> Side:
    ds = build(suffix)
    ds = dataclasses.replace(ds, experiment=ds.experiment.model_copy(update={"startup": startup}))
    exp, device = ds.experiment.id, ds.experiment.devices[0].id
    alert_id = f"alert-{suffix}"
    with _connect(state.writer_url) as conn:  # the lab's writer: the sink's and alert service's paths
        load(conn, ds)
        with conn.transaction():
            writer.write_late_readings(conn, ds.batches[:1])
            conn.execute(
                "INSERT INTO alerts (alert_id, experiment_id, rule, kind, severity, subject, device_id, status,"
                " fired_at, summary) VALUES (%s, %s, 'offline', 'device_offline', 'warning', %s, %s, 'firing',"
                " now(), 'silent')",
                (alert_id, exp, device, device),
            )
            conn.execute("UPDATE alerts SET status = 'resolved', resolved_at = now() WHERE alert_id = %s", (alert_id,))
            conn.execute(  # and one still open
                "INSERT INTO alerts (alert_id, experiment_id, rule, kind, severity, subject, device_id, status,"
                " fired_at, summary) VALUES (%s, %s, 'offline_long', 'device_offline', 'critical', %s, %s, 'firing',"
                " now(), 'silent again')",
                (f"{alert_id}-open", exp, device, device),
            )
            conn.execute(
                "INSERT INTO alert_deliveries (delivery_id, alert_id, event, channel, target, payload)"
                " VALUES (%s, %s, 'firing', 'webhook', 'lab:ops', %s)",
                (f"d-{suffix}", alert_id, Jsonb({"secret_of": startup})),
            )
            conn.execute(
                "INSERT INTO alert_state (experiment_id, state) VALUES (%s, '{}')"
                " ON CONFLICT (experiment_id) DO UPDATE SET state = EXCLUDED.state",
                (exp,),
            )
    with _connect(state.owner_url) as conn:
        g = access.grant(conn, startup, f"test {suffix}", sql=True)
    return Side(startup, exp, device, ds.rejections[0].rejection_id, alert_id, g)


@pytest.fixture(scope="module")
def world(stack_state: StackState) -> World:
    a = _side(stack_state, "acca", STARTUP_A)
    b = _side(stack_state, "accb", STARTUP_B)
    # rejections that belong to nobody but the lab: an unregistered experiment, no experiment
    t = to_ms(build("x").t0)
    with _connect(stack_state.writer_url) as conn:
        writer.write_rejections(
            conn,
            [
                Rejection(
                    Reason.UNKNOWN_DEVICE, "?", "pilots/ghost/d/telemetry", t, "ghost", "d", None, "x", "ghost-1"
                ),
                Rejection(Reason.BAD_TOPIC, "?", "elsewhere", t, None, None, None, "x", "nowhere-1"),
            ],
        )
    with _connect(stack_state.owner_url) as conn:
        lab = access.grant(conn, None, "lab test")
    return World(stack_state, a, b, lab)


def _relations(conn: psycopg.Connection) -> list[tuple[str, str]]:
    return conn.execute(
        "SELECT relname, relkind::text FROM pg_class WHERE relnamespace = 'public'::regnamespace"
        " AND relkind IN ('r', 'p', 'v', 'm', 'f') ORDER BY relname"
    ).fetchall()


def _columns(conn: psycopg.Connection, rel: str) -> set[str]:
    return {
        r[0]
        for r in conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
            (f"public.{rel}",),
        )
    }


def _experiments_seen(conn: psycopg.Connection, rel: str) -> tuple[int, set]:
    cols = _columns(conn, rel)
    q = sql.SQL("SELECT count(*), {} FROM {} GROUP BY 2").format(
        sql.Identifier("experiment_id") if "experiment_id" in cols else sql.SQL("NULL::text"), sql.Identifier(rel)
    )
    rows = conn.execute(q).fetchall()
    return sum(r[0] for r in rows), {r[1] for r in rows}


# --- the catalog: nothing a startup reads is left unsecured -------------------------------------


def test_every_table_with_startup_rows_has_a_policy_and_everything_readable_is_row_secured(world: World):
    with _connect(world.state.owner_url) as conn:
        rels = _relations(conn)
        assert len(rels) > 15
        policies = {
            (r[0], r[1])
            for r in conn.execute(
                "SELECT tablename::text, unnest(roles)::text FROM pg_policies WHERE schemaname = 'public'"
            )
        }
        rls = dict(
            conn.execute(
                "SELECT relname, relrowsecurity FROM pg_class WHERE relnamespace = 'public'::regnamespace"
                " AND relkind IN ('r', 'p')"
            ).fetchall()
        )
        invoker_views = {
            r[0]
            for r in conn.execute(
                "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relkind = 'v'"
                " AND 'security_invoker=true' = ANY (coalesce(reloptions, '{}'))"
            )
        }
        problems = []
        for rel, kind in rels:
            readable = conn.execute(
                "SELECT has_table_privilege('pilotlab_startups', %s, 'SELECT')", (f"public.{rel}",)
            ).fetchone()[0]
            startup_policy = (rel, "pilotlab_startups") in policies
            holds_startup_rows = bool(_columns(conn, rel) & STARTUP_KEYS)
            if kind in ("r", "p"):
                if holds_startup_rows and rel not in LAB_ONLY and not (rls[rel] and startup_policy):
                    problems.append(f"{rel}: holds startup rows but has no row-level security policy for startups")
                if holds_startup_rows and rel in LAB_ONLY and not (rls[rel] or not readable):
                    problems.append(f"{rel}: the lab's, but readable by startups without row-level security")
                if readable and holds_startup_rows and not (rls[rel] and startup_policy):
                    problems.append(f"{rel}: readable by startups without a row-level security policy")
            elif readable and rel not in invoker_views:
                problems.append(f"{rel}: a view startups read that is not security_invoker (bypasses RLS)")
            elif kind == "m" and readable:
                problems.append(f"{rel}: a materialized view (no RLS) readable by startups")
        assert problems == []
        # no SECURITY DEFINER function in the schema: every query function runs as its caller
        definers = conn.execute(
            "SELECT proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace AND prosecdef"
        ).fetchall()
        assert definers == []
        # nothing is granted to startups by default on what later migrations create
        defaults = conn.execute(
            "SELECT count(*) FROM pg_default_acl d, aclexplode(d.defaclacl) a"
            " WHERE a.grantee = 'pilotlab_startups'::regrole"
        ).fetchone()[0]
        assert defaults == 0


# --- direct SQL with the startup's own role ------------------------------------------------------


def test_a_reads_only_its_own_rows_from_every_table_and_view(world: World):
    a_url = world.a.url_of(world.state.owner_url)
    with _connect(world.state.owner_url) as owner, _connect(a_url) as a:
        assert a.execute("SELECT current_user, pilotlab_current_startup()").fetchone() == (
            world.a.grant.role,
            STARTUP_A,
        )
        seen_rows = 0
        for rel, _ in _relations(owner):
            total, exps = _experiments_seen(owner, rel) if rel != "schema_migrations" else (0, set())
            if rel in LAB_ONLY:
                with pytest.raises(Refused):
                    a.execute(sql.SQL("SELECT 1 FROM {} LIMIT 1").format(sql.Identifier(rel)))
                continue
            n, seen = _experiments_seen(a, rel)
            if "experiment_id" in _columns(owner, rel):
                assert seen <= {world.a.experiment_id}, (rel, seen)
                assert {world.a.experiment_id, world.b.experiment_id} <= exps, rel  # both exist
                # exactly A's rows: the lab's count of them
                expected = owner.execute(
                    sql.SQL("SELECT count(*) FROM {} WHERE experiment_id = %s").format(sql.Identifier(rel)),
                    (world.a.experiment_id,),
                ).fetchone()[0]
                assert n == expected > 0, rel
                seen_rows += n
            elif rel == "alert_deliveries":
                assert a.execute("SELECT array_agg(alert_id) FROM alert_deliveries").fetchone()[0] == [world.a.alert_id]
            elif rel == "startup_roles":
                assert a.execute("SELECT startup FROM startup_roles").fetchall() == [(STARTUP_A,)]
                assert total > n
            elif not _columns(owner, rel) & STARTUP_KEYS:
                assert n == total, rel  # reference data (kpi_kinds): no startup's rows in it, the same for all
            else:
                pytest.fail(f"{rel}: a relation this test does not know; decide what a startup sees of it")
        assert seen_rows > 1000  # readings included
        # the rejections nobody owns (unknown experiment, none) are not A's
        assert (
            a.execute("SELECT count(*) FROM rejections WHERE rejection_id IN ('ghost-1', 'nowhere-1')").fetchone()[0]
            == 0
        )
        assert (
            owner.execute("SELECT count(*) FROM rejections WHERE rejection_id IN ('ghost-1', 'nowhere-1')").fetchone()[
                0
            ]
            == 2
        )


def test_b_is_invisible_to_a_even_by_its_exact_ids(world: World):
    b = world.b
    probes = [
        ("SELECT count(*) FROM experiments WHERE experiment_id = %s", b.experiment_id),
        ("SELECT count(*) FROM experiments WHERE startup = %s", b.startup),
        ("SELECT count(*) FROM devices WHERE device_id = %s", b.device_id),
        ("SELECT count(*) FROM readings WHERE device_id = %s", b.device_id),
        ("SELECT count(*) FROM readings WHERE experiment_id = %s", b.experiment_id),
        ("SELECT count(*) FROM late_readings WHERE device_id = %s", b.device_id),
        ("SELECT count(*) FROM readings_1m WHERE device_id = %s", b.device_id),
        ("SELECT count(*) FROM readings_1h WHERE experiment_id = %s", b.experiment_id),
        ("SELECT count(*) FROM kpi_values WHERE experiment_id = %s", b.experiment_id),
        ("SELECT count(*) FROM device_status WHERE device_id = %s", b.device_id),
        ("SELECT count(*) FROM rejections WHERE rejection_id = %s", b.rejection_id),
        ("SELECT count(*) FROM alerts WHERE alert_id = %s", b.alert_id),
        ("SELECT count(*) FROM alert_deliveries WHERE alert_id = %s", b.alert_id),
        ("SELECT count(*) FROM startup_roles WHERE startup = %s", b.startup),
    ]
    with _connect(world.a.url_of(world.state.owner_url)) as a, _connect(world.state.reader_url) as lab:
        for q, arg in probes:
            assert lab.execute(q, (arg,)).fetchone()[0] > 0, q  # the lab sees it: the probe is real
            assert a.execute(q, (arg,)).fetchone()[0] == 0, q
        # joins and sub-selects see through nothing either
        assert (
            a.execute(
                "SELECT count(*) FROM readings r JOIN devices d USING (device_id) WHERE d.experiment_id = %s",
                (b.experiment_id,),
            ).fetchone()[0]
            == 0
        )


def _function_calls(exp: str, device: str, t0, t1) -> dict[str, tuple[str, tuple]]:
    """Every query function of the schema (in any migration so far), called for one experiment
    or device, or for all (what the caller may see). A function in the database that is not
    here fails test_every_query_function_returns_only_the_callers_rows until it is added."""
    return {
        "kpi_period_summary": ("SELECT * FROM kpi_period_summary(%s)", (exp,)),
        "rejections_by_reason": ("SELECT * FROM rejections_by_reason(%s)", (exp,)),
        "experiment_period": (
            "SELECT %s::text, experiment_period(%s, %s) WHERE experiment_period(%s, %s) IS NOT NULL",
            (exp, exp, t0 + timedelta(days=1, hours=1), exp, t0 + timedelta(days=1, hours=1)),
        ),
        "kpi_series": ("SELECT %s::text, * FROM kpi_series(%s, 'no2_mean_1h')", (exp, exp)),
        "kpi_baseline_vs_intervention": ("SELECT %s::text, * FROM kpi_baseline_vs_intervention(%s)", (exp, exp)),
        "kpi_treatment_vs_control": ("SELECT %s::text, * FROM kpi_treatment_vs_control(%s)", (exp, exp)),
        "metric_series": ("SELECT %s::text, * FROM metric_series(%s, 'no2', '5 minutes', %s, %s)", (exp, exp, t0, t1)),
        "device_series": (
            "SELECT %s::text, * FROM device_series(%s, 'no2', '1 hour', %s, %s)",
            (device, device, t0, t1),
        ),
        "device_health": ("SELECT * FROM device_health(%s)", (exp,)),
        "rejections_timeline": (
            "SELECT %s::text, * FROM rejections_timeline(%s, '1 hour', %s, %s)",
            (exp, exp, t0, t1),
        ),
        "streams_period_overview": ("SELECT %s::text, * FROM streams_period_overview(%s)", (exp, exp)),
        "streams_impact": ("SELECT %s::text, * FROM streams_impact(%s)", (exp, exp)),
        "impact_device_periods": ("SELECT * FROM impact_device_periods(%s, 'no2')", (exp,)),
        "alert_history": ("SELECT * FROM alert_history(%s)", (exp,)),
        "pilotlab_current_startup": ("SELECT pilotlab_current_startup() WHERE %s::text IS NULL", (None,)),
        # migration 0040 (the read side)
        "experiment_kpis": ("SELECT %s::text, * FROM experiment_kpis(%s)", (exp, exp)),
        "experiment_list": ("SELECT * FROM experiment_list() WHERE %s::text IS NULL", (None,)),
        "experiment_info": ("SELECT * FROM experiment_info(%s)", (exp,)),
        "device_last_status": ("SELECT * FROM device_last_status(%s)", (exp,)),
        "experiments_overview": ("SELECT * FROM experiments_overview(%s, %s)", (t0, t1 + timedelta(days=9))),
        "traffic_summary": ("SELECT * FROM traffic_summary(%s, %s)", (t0, t1 + timedelta(days=9))),
        "message_rate": ("SELECT * FROM message_rate('1 day', %s, %s)", (t0, t1 + timedelta(days=9))),
        "pipeline_throughput": ("SELECT * FROM pipeline_throughput('1 day', %s, %s)", (t0, t1 + timedelta(days=9))),
        "device_rejections": ("SELECT %s::text, * FROM device_rejections(%s, %s, %s)", (exp, exp, t0, t1)),
        "latest_rejections": ("SELECT * FROM latest_rejections(%s, %s, %s)", (exp, t0, t1)),
        "device_samples_hourly": ("SELECT * FROM device_samples_hourly(%s, %s, %s)", (exp, t0, t1)),
        # migration 0041 (alerts on the read side)
        "open_alerts": ("SELECT * FROM open_alerts(%s)", (exp,)),
        "open_alert_counts": ("SELECT * FROM open_alert_counts() WHERE %s::text IS NULL", (None,)),
        "alert_transitions": ("SELECT * FROM alert_transitions(%s, %s, %s)", (exp, t0, t1)),
        "alert_transition_counts": (
            "SELECT %s::text, * FROM alert_transition_counts(%s, '1 day', %s, %s)",
            (exp, exp, t0, t1),
        ),
        "group_completeness_hourly": (
            "SELECT %s::text, * FROM group_completeness_hourly(%s, %s, %s)",
            (exp, exp, t0, t1),
        ),
    }


# functions over every experiment: what A gets is compared with the lab's figures for A alone
ALL_EXPERIMENTS = {
    "experiment_list",
    "experiments_overview",
    "traffic_summary",
    "message_rate",
    "pipeline_throughput",
    "open_alert_counts",
}


def test_every_query_function_returns_only_the_callers_rows(world: World):
    t0 = build("x").t0 - timedelta(days=1)
    t1 = t0 + timedelta(days=3)
    with _connect(world.state.owner_url) as owner:
        names = {
            r[0]
            for r in owner.execute(
                "SELECT proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace"
                " AND proname NOT IN ('time_bucket', 'apply_retention')"
            )
        }
    a_calls = _function_calls(world.a.experiment_id, world.a.device_id, t0, t1)
    b_calls = _function_calls(world.b.experiment_id, world.b.device_id, t0, t1)
    assert names <= set(a_calls), f"query functions this test does not call: {sorted(names - set(a_calls))}"
    b_marker = "accb"  # in B's experiment and device ids (build("accb"))
    with _connect(world.a.url_of(world.state.owner_url)) as a, _connect(world.state.reader_url) as lab:
        for name in sorted(names):
            q, args = b_calls[name]
            lab_rows = lab.execute(q, args).fetchall()
            a_rows = a.execute(q, args).fetchall()
            if name not in ("streams_impact", "pilotlab_current_startup", *ALL_EXPERIMENTS):
                assert lab_rows, f"{name}: the lab sees B's rows (the probe is real)"
                assert a_rows == [], f"{name} shows B's rows to A: {a_rows[:3]}"
            assert b_marker not in repr(a_rows), f"{name} shows B's rows to A: {a_rows[:3]}"
            if name not in ("streams_impact", "pilotlab_current_startup", "experiment_list"):
                q, args = a_calls[name]
                assert a.execute(q, args).fetchall(), f"{name}: A sees its own rows"
        # over every experiment: A's figures are the lab's for A's experiment alone
        assert a.execute("SELECT experiment_id FROM experiment_list()").fetchall() == [(world.a.experiment_id,)]
        if "traffic_summary" in names:
            got = a.execute("SELECT datapoints, rejections, experiments FROM traffic_summary(%s, now())", (t0,))
            expected = lab.execute(
                "SELECT (SELECT count(*) FROM readings WHERE experiment_id = %s AND received_at >= %s),"
                "       (SELECT count(*) FROM rejections WHERE experiment_id = %s AND received_at >= %s), 1",
                (world.a.experiment_id, t0, world.a.experiment_id, t0),
            )
            assert got.fetchone() == expected.fetchone()
        # NULL = every experiment: A's only
        reasons = dict(a.execute("SELECT reason, rejections FROM rejections_by_reason(NULL)").fetchall())
        assert sum(reasons.values()) == 3  # build() makes three per experiment; none of B's, none unowned
        assert {r[1] for r in a.execute("SELECT * FROM alert_history()").fetchall()} == {world.a.experiment_id}
        if "open_alert_counts" in names:
            assert a.execute("SELECT experiment_id, open FROM open_alert_counts()").fetchall() == [
                (world.a.experiment_id, 1)
            ]
        # retention is the owner's
        with pytest.raises(Refused):
            a.execute("SELECT apply_retention()")


def test_roles_sql_gives_startup_roles_made_before_it_their_search_path(world: World):
    """A deployment whose startup roles predate migration 0044 gets their search path by
    running storage/roles.sql again (as the embedded stack does at every start)."""
    role = sql.Identifier(world.a.grant.role)
    with postgres_admin_connect(world.state) as su:
        su.execute(sql.SQL("ALTER ROLE {} RESET search_path").format(role))
        try:
            with _connect(world.a.url_of(world.state.owner_url)) as a:
                assert a.execute("SHOW search_path").fetchone()[0] == '"$user", public'
            roles.bootstrap(su)
            with _connect(world.a.url_of(world.state.owner_url)) as a:
                assert a.execute("SHOW search_path").fetchone()[0] == "pilotlab_startup, public"
        finally:  # for the tests after this one, whatever happened
            su.execute(sql.SQL("ALTER ROLE {} SET search_path = pilotlab_startup, public").format(role))


def test_a_writes_nothing_and_cannot_become_anyone_else(world: World):
    a_url = world.a.url_of(world.state.owner_url)
    with _connect(a_url) as a:
        assert a.execute("SHOW default_transaction_read_only").fetchone()[0] == "on"
        # the per-startup views of TimescaleDB mode first (migration 0044; an empty schema here)
        assert a.execute("SHOW search_path").fetchone()[0] == "pilotlab_startup, public"
        a.execute("SET default_transaction_read_only = off")  # its own default to lift: buys nothing
        for stmt in (
            "INSERT INTO experiments (experiment_id) VALUES ('mine')",
            f"UPDATE experiments SET startup = '{STARTUP_A}'",
            "UPDATE readings SET value = 0",
            "DELETE FROM readings",
            "DELETE FROM rejections",
            "UPDATE alerts SET status = 'resolved'",
            "TRUNCATE kpi_values",
            "INSERT INTO startup_roles VALUES ('beta', 'startup_x')",
            f"UPDATE startup_roles SET startup = '{STARTUP_B}'",
            "CREATE TABLE mine (a int)",
            "CREATE TEMP TABLE mine (a int)",
            "SELECT * FROM access_tokens",
            "SELECT lo_create(0)",
            "SELECT pilotlab_admin.set_startup_login('startup_beta', NULL)",
            "SELECT pilotlab_admin.ensure_startup_role('startup_mine')",
            f"SET ROLE {world.b.grant.role}",
            "SET ROLE grafana_reader",
            "SET ROLE pilotlab_writer",
            f"GRANT {world.b.grant.role} TO {world.a.grant.role}",
            f"ALTER ROLE {world.a.grant.role} BYPASSRLS",
            f"ALTER ROLE {world.a.grant.role} CONNECTION LIMIT 50",
            f"GRANT {world.a.grant.role} TO {world.b.grant.role}",  # sharing itself: needs ADMIN OPTION
        ):
            with pytest.raises(Refused):
                a.execute(stmt)
        # the group role it belongs to: taking it (SET ROLE) shows nothing at all
        a.execute("SET ROLE pilotlab_startups")
        assert a.execute("SELECT count(*) FROM readings").fetchone()[0] == 0
        assert a.execute("SELECT count(*) FROM experiments").fetchone()[0] == 0
        a.execute("RESET ROLE")
        # no other database
        with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
            psycopg.connect(a_url.replace("/pilotlab", "/postgres"), connect_timeout=5)


# --- the portal's path: authenticate + scoped, as grafana_reader ---------------------------------


def test_the_portal_path_scopes_every_query_to_the_tokens_startup(world: World):
    with _connect(world.state.reader_url) as conn:
        p = access.authenticate(conn, world.a.grant.token)
        assert p == access.Principal(world.a.grant.token_id, STARTUP_A, world.a.grant.role, "test acca")
        lab = access.authenticate(conn, world.lab.token)
        assert lab is not None and lab.is_lab
        all_exps = {r[0] for r in conn.execute("SELECT experiment_id FROM experiments")}
        with access.scoped(conn, p) as s:
            # whatever SQL the portal runs, B's rows are not there
            assert {r[0] for r in s.execute("SELECT experiment_id FROM experiments")} == {world.a.experiment_id}
            assert (
                s.execute("SELECT count(*) FROM readings WHERE device_id = %s", (world.b.device_id,)).fetchone()[0] == 0
            )
            assert s.execute("SELECT * FROM alert_history(%s)", (world.b.experiment_id,)).fetchall() == []
            with pytest.raises(Refused):
                s.execute("SELECT * FROM access_tokens")
        # the role is given back with the transaction, even when the block fails
        assert conn.execute("SELECT current_user").fetchone()[0] == "grafana_reader"
        with pytest.raises(ZeroDivisionError), access.scoped(conn, p):
            raise ZeroDivisionError
        assert conn.execute("SELECT current_user").fetchone()[0] == "grafana_reader"
        with access.scoped(conn, lab) as s:
            assert {r[0] for r in s.execute("SELECT experiment_id FROM experiments")} == all_exps
        # inside a transaction already: refused (SET LOCAL would outlive a savepoint)
        with conn.transaction(), pytest.raises(access.AccessError), access.scoped(conn, p):
            pass
        # a principal naming another startup's role: the database says whom it acts for
        forged = dataclasses.replace(p, startup=STARTUP_B)
        with pytest.raises(access.AccessError, match="acts for"), access.scoped(conn, forged):
            pass


def test_tokens_wrong_revoked_or_malformed_authenticate_nobody(world: World):
    token = world.a.grant.token
    tid = world.a.grant.token_id
    with _connect(world.state.reader_url) as conn:
        for bad in (
            "",
            "plt_",
            token[:-1],
            token + "x",
            token[:-1] + ("A" if token[-1] != "A" else "B"),  # right id, wrong secret
            f"plt_{tid}_{'a' * 43}",
            token.replace("plt_", "PLT_"),
            "plt_0000000000000000_" + token.rsplit("_", 1)[-1],
            f"plt_{tid}_' OR '1'='1",
        ):
            assert access.authenticate(conn, bad) is None, bad
    with _connect(world.state.owner_url) as owner:
        g = access.grant(owner, STARTUP_A, "to revoke")
    with _connect(world.state.reader_url) as conn:
        assert access.authenticate(conn, g.token) is not None
    with _connect(world.state.owner_url) as owner:
        assert access.revoke(owner, g.token_id).revoked_at is not None
        assert access.revoke(owner, g.token_id) is None  # once
    with _connect(world.state.reader_url) as conn:
        assert access.authenticate(conn, g.token) is None
        assert access.authenticate(conn, world.a.grant.token) is not None  # the others stay


def test_tokens_and_passwords_are_stored_hashed_only(world: World):
    secrets_given = [world.a.grant.token, world.b.grant.token, world.lab.token]
    passwords = [world.a.grant.sql_password, world.b.grant.sql_password]
    with _connect(world.state.owner_url) as owner:
        rows = owner.execute("SELECT t::text, token_id, token_hash FROM access_tokens t").fetchall()
        dump = "\n".join(r[0] for r in rows)
        # the whole token, its secret (after "plt_<id>_": token_urlsafe may itself hold "_", so
        # not what follows the last one — a fragment like "4" turns up in any dump by chance)
        # and each SQL password appear nowhere
        for s in [*secrets_given, *(t.split("_", 2)[2] for t in secrets_given), *passwords]:
            assert len(s) >= 32 and s not in dump
        hashes = {r[1]: bytes(r[2]) for r in rows}
        for g in (world.a.grant, world.lab):
            assert hashes[g.token_id] == hashlib.sha256(g.token.encode()).digest()
    with postgres_admin_connect(world.state) as admin:
        stored = admin.execute(
            "SELECT rolname, rolpassword FROM pg_authid WHERE rolname = ANY(%s)",
            ([world.a.grant.role, world.b.grant.role],),
        ).fetchall()
        assert len(stored) == 2
        for _, verifier in stored:
            assert verifier.startswith("SCRAM-SHA-256$4096:")
            assert not any(p in verifier for p in passwords)


def test_revoking_the_sql_grant_closes_the_login_and_its_sessions(world: World):
    base = world.state.owner_url
    with _connect(base) as owner:
        first = access.grant(owner, "gamma", "sql 1", sql=True)
        second = access.grant(owner, "gamma", "sql 2", sql=True)  # replaces the first password
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        _connect(access.sql_url(base, first.role, first.sql_password))
    session = _connect(access.sql_url(base, second.role, second.sql_password))
    assert session.execute("SELECT pilotlab_current_startup()").fetchone()[0] == "gamma"
    with _connect(base) as owner:
        rows = {r.token_id: r for r in access.list_grants(owner)}
        assert not rows[first.token_id].sql_login and rows[second.token_id].sql_login
        access.revoke(owner, first.token_id)  # not the login's grant: the login stays
    assert session.execute("SELECT 1").fetchone() == (1,)
    with _connect(base) as owner:
        access.revoke(owner, second.token_id)
    with pytest.raises(psycopg.OperationalError):
        session.execute("SELECT 1")  # its session was ended
    session.close()
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        _connect(access.sql_url(base, second.role, second.sql_password))


def test_names_that_would_be_sql_or_roles_stay_data(world: World):
    evil = 'x"; DROP ROLE pilotlab_owner; --'
    with _connect(world.state.owner_url) as owner:
        g = access.grant(owner, evil, "evil", sql=True)
        assert g.role == access.role_name(evil) and g.role.startswith("startup_x_drop_role_pilotlab_owner_")
        assert owner.execute("SELECT count(*) FROM pg_roles WHERE rolname = 'pilotlab_owner'").fetchone()[0] == 1
        # the admin functions touch startup roles only, whatever the owner passes them
        for role in ("pilotlab_writer", "grafana_reader", "pilotlab_owner", "startup_", "postgres", "startup_A"):
            with pytest.raises((psycopg.errors.InvalidParameterValue, psycopg.errors.UndefinedObject)):
                owner.execute("SELECT pilotlab_admin.set_startup_login(%s, NULL)", (role,))
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="SCRAM"):
            owner.execute("SELECT pilotlab_admin.set_startup_login(%s, 'plaintext')", (g.role,))
    with _connect(access.sql_url(world.state.owner_url, g.role, g.sql_password)) as conn:
        assert conn.execute("SELECT pilotlab_current_startup()").fetchone()[0] == evil
        assert conn.execute("SELECT count(*) FROM experiments").fetchone()[0] == 0
    # a role named like a startup's but made by someone else is refused, not taken over
    with postgres_admin_connect(world.state) as admin:
        admin.execute("DROP ROLE IF EXISTS startup_squatter")
        admin.execute("CREATE ROLE startup_squatter LOGIN")
        try:
            with _connect(world.state.owner_url) as owner, pytest.raises(Refused, match="not a pilotlab startup"):
                owner.execute("SELECT pilotlab_admin.ensure_startup_role('startup_squatter')")
        finally:
            admin.execute("DROP ROLE startup_squatter")
    # only the owner may call them
    for url in (world.state.writer_url, world.state.reader_url):
        with _connect(url) as conn, pytest.raises(Refused):
            conn.execute("SELECT pilotlab_admin.ensure_startup_role('startup_x')")


def test_the_lab_roles_are_unaffected(world: World):
    with _connect(world.state.reader_url) as lab, _connect(world.state.owner_url) as owner:
        for rel, _ in _relations(owner):
            if rel in ("schema_migrations",):
                continue
            q = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(rel))
            assert lab.execute(q).fetchone()[0] == owner.execute(q).fetchone()[0], rel
    with _connect(world.state.writer_url) as w:  # the writer reads what it upserts, all of it
        assert {r[0] for r in w.execute("SELECT DISTINCT experiment_id FROM readings")} >= {
            world.a.experiment_id,
            world.b.experiment_id,
        }


def test_the_access_commands(world: World):
    env = {
        "PATH": os.environ["PATH"],
        "PGPASSFILE": "/nonexistent",
        "PILOTLAB_DATABASE_OWNER_URL": world.state.owner_url,
    }

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "control", "access", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    out = cli("grant", "--startup", STARTUP_B, "--label", "cli", "--sql", "--json")
    assert out.returncode == 0, out.stderr
    g = json.loads(out.stdout)
    assert access.parse_token(g["token"]) == g["token_id"] and g["role"] == world.b.grant.role
    assert conninfo_to_dict(g["database_url"])["user"] == world.b.grant.role
    with _connect(g["database_url"]) as conn:
        assert conn.execute("SELECT DISTINCT startup FROM experiments").fetchall() == [(STARTUP_B,)]
    listed = json.loads(cli("list", "--json").stdout)
    mine = next(r for r in listed if r["token_id"] == g["token_id"])
    assert mine | {"created_at": None} == {
        "token_id": g["token_id"],
        "startup": STARTUP_B,
        "role": world.b.grant.role,
        "label": "cli",
        "sql": True,
        "created_at": None,
        "revoked_at": None,
    }
    assert g["token"] not in cli("list").stdout
    text = cli("grant", "--lab", "--label", "ops")
    assert text.returncode == 0 and "the lab" in text.stdout
    assert cli("grant").returncode != 0 and cli("grant", "--lab", "--startup", "x").returncode != 0
    assert cli("grant", "--lab", "--sql").returncode != 0
    yaml = cli("grafana-datasource", "--startup", STARTUP_B).stdout
    assert f"user: {world.b.grant.role}" in yaml and "${PILOTLAB_STARTUP_DB_PASSWORD}" in yaml
    revoked = cli("revoke", g["token_id"])
    assert revoked.returncode == 0 and "SQL login is closed" in revoked.stdout
    assert cli("revoke", g["token_id"]).returncode != 0
    with pytest.raises(psycopg.OperationalError):
        _connect(g["database_url"])
    # B's fixture login was replaced by the CLI's SQL grant, then closed: give B one back
    with _connect(world.state.owner_url) as owner:
        world.b.grant = access.grant(owner, STARTUP_B, "again", sql=True)
