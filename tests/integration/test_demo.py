"""The README's first command, as a user runs it: ``pilotlab demo --json`` brings its own
stack up, recovers each simulated pilot's true effect, and leaves nothing running."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pilotlab.stack import Stack, pid_alive

pytestmark = pytest.mark.integration


def test_demo_json_recovers_true_effects_and_stops_everything(tmp_path: Path):
    data = tmp_path / "demo"
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pilotlab", "demo", "--duration", "5", "--json", "--data-dir", str(data)],
            capture_output=True, text=True, timeout=600, check=False,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        doc = json.loads(result.stdout)  # stdout is exactly one JSON document
        state = Stack(data).load()
        assert state is not None and len(state.services) == 3
        left = [s.name for s in state.services.values() if pid_alive(s.pid, s.binary)]
        assert not left, f"demo left running: {left}"
    finally:
        Stack(data).down(purge=True)
    assert [e["id"] for e in doc["experiments"]] == [
        "adaptive-lighting-borgo-po", "lez-san-salvario", "smart-parking-crocetta",
    ]
    assert doc["tables"]["readings"] == doc["datapoints_accepted_expected"]
    assert doc["tables"]["rejections"] == sum(doc["rejections_expected"].values()) > 0
    impacts = [k["impact"] for e in doc["experiments"] for k in e["kpis"] if "impact" in k]
    assert len(impacts) == 4
    for imp in impacts:
        assert imp["estimate"] == pytest.approx(imp["true_effect"], abs=0.03), imp
    for exp in doc["experiments"]:
        assert exp["rejections"], f"{exp['id']}: the demo injects broken payloads"
        mean_kpi = next(k for k in exp["kpis"] if k["kind"] == "mean")
        for periods in mean_kpi["groups"].values():
            assert periods["baseline"] is not None and periods["intervention"] is not None
