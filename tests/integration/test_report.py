"""``pilotlab report``: the HTML impact report of a pilot replayed through the real pipeline."""

from __future__ import annotations

import re
import subprocess
import sys

import psycopg
import pytest

from dashboards.report import load, pct, render
from tests.integration.test_dashboards_sql import EXPERIMENT_ID, filled_pilot

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pilot(stack_state, stack):
    return filled_pilot(stack_state, stack)


def _cli(args, database_url, cwd):
    env = {"PATH": "/usr/bin:/bin", "PILOTLAB_DATABASE_URL": database_url} if database_url else {"PATH": "/usr/bin"}
    return subprocess.run([sys.executable, "-m", "pilotlab", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120, check=False)


def test_report_command_writes_a_self_contained_page(pilot, stack_state, tmp_path):
    out = tmp_path / "r" / "pilot.html"
    res = _cli(["report", EXPERIMENT_ID, "--out", str(out)], stack_state.database_url, tmp_path)
    assert res.returncode == 0, res.stderr
    html = out.read_text(encoding="utf-8")

    # self-contained: no script, no external resource to fetch at view time
    assert "<script" not in html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "@import" not in html and "url(" not in html

    with psycopg.connect(stack_state.database_url) as conn:
        details = conn.execute("SELECT details FROM kpi_values WHERE experiment_id = %s AND kind = 'impact'",
                               (EXPERIMENT_ID,)).fetchone()[0]
        stored = dict(conn.execute("SELECT reason, count(*) FROM rejections WHERE experiment_id = %s GROUP BY 1",
                                   (EXPERIMENT_ID,)).fetchall())
    # the impact with its CI, as the streams engine stored it
    assert pct(details["estimate"]) in html
    assert f"95% CI {pct(details['ci_low'])} … {pct(details['ci_high'])}" in html
    # the sections and their charts
    for heading in ("Impact", "Treatment vs control over time", "Baseline vs intervention", "Completeness",
                    "Rejections"):
        assert f"<h2>{heading}</h2>" in html
    assert html.count("<svg") >= 5
    # every device, every rejection reason with its count
    for d in pilot["experiment"].devices:
        assert d.id in html
    assert sum(stored.values()) == sum(pilot["truth"].rejected.values())
    for reason, n in stored.items():
        assert reason in html and f">{n:,}</text>" in html


def test_report_data_matches_the_pipeline(pilot, stack_state):
    with psycopg.connect(stack_state.database_url) as conn:
        data = load(conn, EXPERIMENT_ID)
    assert [i.kpi for i in data.impacts] == ["no2_impact"]
    assert data.impacts[0].true_effect == -0.2
    assert set(data.series) == {"treatment", "control"}
    assert {(p.kpi, p.group) for p in data.periods} >= {("no2_mean", "treatment"), ("no2_mean", "control")}
    assert len(data.devices) == 6 and all(0 < d.completeness <= 1 for d in data.devices)
    assert data.readings == len(pilot["truth"].accepted)
    assert render(data).startswith("<!doctype html>")


def test_unknown_experiment_and_missing_database_url_are_one_line_errors(stack_state, tmp_path):
    res = _cli(["report", "no-such-pilot", "--out", str(tmp_path / "x.html")], stack_state.database_url, tmp_path)
    assert res.returncode == 1
    assert "no experiment 'no-such-pilot'" in res.stderr and EXPERIMENT_ID in res.stderr
    res = _cli(["report", EXPERIMENT_ID, "--out", str(tmp_path / "x.html")], None, tmp_path)
    assert res.returncode != 0 and "PILOTLAB_DATABASE_URL" in res.stderr
    assert not (tmp_path / "x.html").exists()
