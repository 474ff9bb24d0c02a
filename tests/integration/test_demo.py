"""The README's first command, as a user runs it: ``pilotlab demo --json`` brings its own
stack up, recovers each simulated pilot's true effect, and leaves nothing running."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from control.demo import EXAMPLES
from control.stack import Stack, pid_alive
from dashboards.impact_text import VERDICTS, metric_scale
from pilotlab.contracts import IMPACT_WARNINGS as WARNINGS
from pilotlab.manifest import load_manifests

pytestmark = pytest.mark.integration


def test_demo_json_recovers_true_effects_and_stops_everything(tmp_path: Path):
    data = tmp_path / "demo"
    try:
        result = subprocess.run(
            [sys.executable, "-m", "control", "demo", "--duration", "5", "--json", "--data-dir", str(data)],
            capture_output=True, text=True, timeout=600, check=False,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        doc = json.loads(result.stdout)  # stdout is exactly one JSON document
        state = Stack(data).load()
        assert state is not None and {"mqtt", "kafka", "postgres"} <= set(state.services)  # + "objects" (durable)
        left = [s.name for s in state.services.values() if pid_alive(s.pid, s.binary)]
        assert not left, f"demo left running: {left}"
    finally:
        Stack(data).down(purge=True)
    assert [e["id"] for e in doc["experiments"]] == [
        "adaptive-lighting-borgo-po", "lez-san-salvario", "smart-parking-crocetta",
    ]
    assert doc["tables"]["readings"] == doc["datapoints_accepted_expected"]
    assert doc["tables"]["rejections"] == sum(doc["rejections_expected"].values()) > 0
    impacts = {(e["id"], k["kpi"]): k["impact"] for e in doc["experiments"] for k in e["kpis"] if "impact" in k}
    imp_metric = {(e["id"], k["kpi"]): k["metric"] for e in doc["experiments"] for k in e["kpis"] if "impact" in k}
    assert len(impacts) == 4
    manifests = {m.id: m for m in load_manifests(EXAMPLES)}
    for (exp_id, kpi), imp in impacts.items():
        assert "absolute" not in imp and "n" not in imp
        # the true effect is stated on the metric's scale: relative here (every demo metric has a true zero)
        assert (imp["scale"], imp["unit"]) == metric_scale(imp_metric[(exp_id, kpi)]) == ("relative", None), imp
        # the shared weather cancels against the control; the before/after parking pilot is simulated
        # without weather (its manifest says so), or it would stay in the change
        assert imp["estimate"] == pytest.approx(imp["true_effect"], abs=0.03), imp
        assert imp["ci_low"] <= imp["estimate"] <= imp["ci_high"], imp
        assert imp["verdict"] in VERDICTS, imp
        assert imp["warning_sentences"] == [WARNINGS[w] for w in imp["warnings"]], imp
        assert imp["method"].startswith("device-level ") and imp["final"] is True, imp
        # devices analysed per group: replicated, and no more than the manifest lists
        listed = {g: sum(1 for d in manifests[exp_id].devices if d.group == g) for g in ("treatment", "control")}
        assert set(imp["devices"]) == {"treatment", "control"}, imp
        for group, n in listed.items():
            assert (2 <= imp["devices"][group] <= n) if n else imp["devices"][group] == 0, (kpi, imp["devices"])
    parking = impacts[("smart-parking-crocetta", "occupancy_impact")]  # no control group: no verdict
    assert parking["verdict"] == "inconclusive" and "no_control_group" in parking["warnings"]
    assert parking["design"] == "before-after" and parking["devices"]["control"] == 0
    assert sum(i["design"] == "difference-in-differences" for i in impacts.values()) == 3
    for exp in doc["experiments"]:
        assert exp["rejections"], f"{exp['id']}: the demo injects broken payloads"
        # the alerts service ran beside the pipeline and judged everything: only the manifest's rules
        alerts = exp["alerts"]
        assert alerts["rules"] == [r.name for r in manifests[exp["id"]].alerts if r.enabled]
        assert set(alerts["by_rule"]) <= set(alerts["rules"]), alerts
        assert alerts["fired"] == sum(r["fired"] for r in alerts["by_rule"].values()) >= alerts["firing"]
        mean_kpi = next(k for k in exp["kpis"] if k["kind"] == "mean")
        for periods in mean_kpi["groups"].values():
            assert periods["baseline"] is not None and periods["intervention"] is not None
    # the LEZ sensor simulated without power for five hours (its manifest's simulation.outages):
    # silent past the rule's 2 h and incomplete in a 6 h window, then back — both alerts resolved
    lez = next(e["alerts"] for e in doc["experiments"] if e["id"] == "lez-san-salvario")
    assert {r: (v["fired"], v["firing"]) for r, v in lez["by_rule"].items()} == {
        "device-offline": (1, 0), "sensor-incomplete": (1, 0),
    }, lez
    assert {a["subject"] for a in lez["newest"]} == {"aq-lez-03"}
    assert sum(e["alerts"]["fired"] for e in doc["experiments"]) == 2  # nothing else went wrong in the street
