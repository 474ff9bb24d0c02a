"""``pilotlab report``: the HTML impact report of a pilot replayed through the real pipeline."""

from __future__ import annotations

import re
import subprocess
import sys
from html import escape

import psycopg
import pytest

from dashboards.impact_text import VERDICT_COLOURS, VERDICT_SYMBOLS, VERDICTS, sentences
from dashboards.report import load, pct, render
from tests.integration.test_dashboards_sql import EXPERIMENT_ID, filled_pilot

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pilot(stack_state, stack):
    return filled_pilot(stack_state, stack)


def _cli(args, database_url, cwd):
    env = {"PATH": "/usr/bin:/bin", "PILOTLAB_DATABASE_URL": database_url} if database_url else {"PATH": "/usr/bin"}
    return subprocess.run([sys.executable, "-m", "control", *args], capture_output=True, text=True, env=env,
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
    # the impact as the streams engine stored it: estimate and CI in its scale, the stored
    # verdict, devices per group, design and method, warnings as sentences, the placebo check
    assert details["scale"] == "relative"
    assert f">{pct(details['estimate'])}</div>" in html
    assert f"95% CI {pct(details['ci_low'])} … {pct(details['ci_high'])}" in html
    verdict = details["verdict"]
    assert f"{VERDICT_SYMBOLS[verdict]} {verdict}</div>" in html and VERDICT_COLOURS[verdict] in html
    assert verdict == "inconclusive" and "short_period" in details["warnings"]  # 90-minute periods
    for sentence in sentences(details["warnings"]):
        assert f"<li>{escape(sentence)}</li>" in html
    t, c = details["devices"]["treatment"], details["devices"]["control"]
    assert (t, c) == (3, 3) and f"<b>{t}</b> treatment" in html and f"<b>{c}</b> control" in html
    assert f"Design: {details['design']}" in html and escape(details["method"]) in html
    assert "Placebo check (baseline, 2nd half vs 1st half): " in html
    # its forest plot: relative, on a % axis, coloured by the verdict
    assert '<h3 class="plot">Relative change, %' in html
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
    imp = data.impacts[0]
    assert imp.true_effect == -0.2
    assert imp.verdict in VERDICTS and imp.scale == "relative" and imp.unit is None
    assert imp.devices == {"treatment": 3, "control": 3} and imp.design == "difference-in-differences"
    assert imp.estimate == pytest.approx(imp.details["estimate"]) and imp.warnings == imp.details["warnings"]
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
