"""The read side goes through the query layer: every Grafana panel and template variable reads
named SQL functions of storage/migrations (never a table), and the SQL's table of KPI kinds
is the registry's (pilotlab/kpi_kinds.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dashboards.build import build_all
from dashboards.checks import sql_targets
from dashboards.sdk import variable_query
from pilotlab.kpi_kinds import KINDS

MIGRATIONS = Path(__file__).resolve().parents[2] / "storage" / "migrations"
# PostgreSQL's own set-returning functions a panel may call besides the query layer's
BUILTINS = {"jsonb_array_elements_text"}


def _strip(sql: str) -> str:
    """The SQL without string literals and comments (what they contain is not a FROM)."""
    sql = re.sub(r"--[^\n]*", " ", sql)
    return re.sub(r"'(?:[^']|'')*'", "''", sql)


_DDL = re.compile(r"\b(CREATE\s+(?:OR\s+REPLACE\s+)?FUNCTION|DROP\s+FUNCTION\s+(?:IF\s+EXISTS\s+)?)\s*(\w+)\s*\(", re.I)


def defined_functions() -> set[str]:
    """The functions the migrations leave defined (created, and not dropped since), by name."""
    names: set[str] = set()
    for f in sorted(MIGRATIONS.glob("*.sql")):
        for verb, name in _DDL.findall(_strip(f.read_text())):
            (names.add if verb.upper().startswith("CREATE") else names.discard)(name.lower())
    return names


def sources(sql: str) -> list[tuple[str, bool]]:
    """What each FROM / JOIN of a query reads: (name, is a function call); subqueries and
    VALUES lists are looked into, not named; names of the query's own CTEs are left out."""
    text = _strip(sql)
    ctes = {m.lower() for m in re.findall(r"(?:\bWITH|,)\s+(\w+)\s+AS\s*\(", text, re.I)}
    out = []
    for m in re.finditer(r"\b(?:FROM|JOIN)\s+(?:LATERAL\s+)?(\(|\w+)\s*(\()?", text, re.I):
        name, call = m.group(1), m.group(2) is not None
        if name == "(" or name.lower() in ctes:
            continue
        out.append((name.lower(), call))
    return out


def queries() -> list[pytest.param]:
    out = []
    for uid, model in build_all().items():
        for panel, target in sql_targets(model):
            out.append(pytest.param(target["rawSql"], id=f"{uid}/{panel['title']}"))
        for var in model.get("templating", {}).get("list", []):
            if var.get("type") == "query":
                out.append(pytest.param(variable_query(var), id=f"{uid}/${var['name']}"))
    return out


def test_the_checker_finds_tables_and_functions():
    assert sources("SELECT * FROM readings r JOIN f(1) x ON true") == [("readings", False), ("f", True)]
    assert sources("WITH a AS (SELECT 1 FROM g()), b AS (SELECT 2) SELECT * FROM a, b") == [("g", True)]
    assert sources("SELECT 'FROM readings' FROM (VALUES (1)) AS v(x) -- FROM devices") == []
    assert sources("SELECT * FROM t LEFT JOIN LATERAL u(t.x) ON true") == [("t", False), ("u", True)]


@pytest.mark.parametrize("sql", queries())
def test_every_panel_reads_named_query_functions(sql):
    known = defined_functions() | BUILTINS
    found = sources(sql)
    assert found, "a panel query that reads nothing"
    tables = [name for name, call in found if not call]
    assert not tables, f"reads tables directly: {tables}\n{sql}"
    unknown = [name for name, _ in found if name not in known]
    assert not unknown, f"not a function of storage/migrations: {unknown}"


def test_one_period_summary():
    """kpi_period_summary (0002) and streams_period_overview (0020) folded the same windows;
    0040 keeps the first, with the kinds' rules (the second its alias), 0042 drops the second,
    and nothing calls it."""
    assert "kpi_period_summary" in defined_functions()
    assert "streams_period_overview" not in defined_functions()
    repo = MIGRATIONS.parents[1]
    for part in ("dashboards", "control", "storage", "streams", "pilotlab", "bench"):
        for path in (repo / part).rglob("*.py"):
            assert "streams_period_overview" not in path.read_text(), path


def _kpi_kinds_rows() -> dict[str, tuple[str | None, str | None, str | None]]:
    text = (MIGRATIONS / "0040_read_side.sql").read_text()
    block = re.search(r"INSERT INTO kpi_kinds \(kind, period_fold, numerator, denominator\) VALUES(.*?);", text,
                      re.S).group(1)  # fmt: skip
    rows = {}
    for row in re.findall(r"\(([^)]*)\)", block):
        cells = [None if c.strip() == "NULL" else c.strip().strip("'") for c in row.split(",")]
        rows[cells[0]] = tuple(cells[1:])
    return rows


def test_the_sql_kinds_table_is_the_registry():
    want = {name: (k.period_fold, *(k.pooled or (None, None))) for name, k in KINDS.items()}
    assert _kpi_kinds_rows() == want
    # the summary dispatches on every fold the registry uses
    summary = (MIGRATIONS / "0040_read_side.sql").read_text().split("FUNCTION kpi_period_summary")[1].split("$$;")[0]
    folds = {k.period_fold for k in KINDS.values() if k.period_fold not in (None, "window_mean")}
    assert {f for f in folds if f"WHEN '{f}' THEN" in summary} == folds
    assert "ELSE avg(w.value)" in summary  # window_mean
