"""``pilotlab plan``: the minimum detectable effect from a baseline already stored in the real
database (its per-device halves read by the SQL function ``impact_device_periods``), and
from the manifest alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
import yaml

from pilotlab.contracts import Reading, ReadingBatch
from simulators.synthetic import PilotSpec, generate
from storage.queries import impact_device_periods
from storage.writer import write_experiments, write_readings
from streams import impact

pytestmark = pytest.mark.integration

SPEC = PilotSpec("plan-from-baseline", 4, 4, interval_s=3600, ar=0.9)


def pilotlab(*args: str, database_url: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PILOTLAB_")}
    if database_url:
        env["PILOTLAB_DATABASE_URL"] = database_url
    return subprocess.run([sys.executable, "-m", "control", *args], capture_output=True, text=True, env=env,
                          timeout=120, check=False)  # fmt: skip


def test_plan_reads_the_stored_baseline(stack_state, tmp_path: Path) -> None:
    exp, readings = generate(SPEC, 5)
    kpi = exp.kpis[0].model_copy(update={"expected_effect": -0.02})
    exp = exp.model_copy(update={"kpis": (kpi,)})
    d = impact.design(exp, kpi)
    group = {dev.id: dev.group for dev in exp.devices}
    baseline = [r for r in readings if r[1] < d.baseline[1]]
    with psycopg.connect(stack_state.database_url) as conn:
        write_experiments(conn, [exp])
        write_readings(conn, [ReadingBatch(exp.id, dev, group[dev], ts, (Reading(i, ts, {"no2": v}),))
                              for i, (dev, ts, v) in enumerate(baseline)])  # fmt: skip
        conn.commit()
        cells = impact_device_periods(conn, exp.id, "no2")
    # the database's cells are the worker's state for the same readings
    want = impact.initialize()
    for dev, ts, v in baseline:
        impact.add(want, d, dev, group[dev], ts, v)
    got = impact.state_from_cells(cells)
    assert got["d"].keys() == want["d"].keys()
    for dev, row in want["d"].items():
        assert got["d"][dev][:2] == row[:2] and got["d"][dev][1::2] == row[1::2]
        assert got["d"][dev][2::2] == pytest.approx(row[2::2])
    sd = impact.baseline_change_sd(want, d)

    manifest = tmp_path / "pilot.yaml"
    manifest.write_text(yaml.safe_dump(exp.model_dump(mode="json")))
    out = pilotlab("plan", str(manifest), "--json", database_url=stack_state.database_url)
    assert out.returncode == 0, out.stderr
    (row,) = json.loads(out.stdout)
    assert row["change_sd"] == pytest.approx(sd) and "baseline" in row["source"]
    assert row["devices"] == {"treatment": 4, "control": 4}
    assert row["mde_decrease"] < -0.02 and "effect_below_mde" in row["warnings"]
    text = pilotlab("plan", str(manifest), database_url=stack_state.database_url).stdout
    assert "detectable with 80% power" in text and "effect_below_mde" in text

    # without a database and without change_sd: the variability is unknown, said plainly
    blind = pilotlab("plan", str(manifest), "--json", database_url=None)
    assert blind.returncode == 0, blind.stderr
    assert json.loads(blind.stdout)[0]["warnings"] == ["unknown_variability"]
    # experiments validate warns (exit 0) when the stated variability cannot detect the hope
    kpi_sd = kpi.model_copy(update={"change_sd": sd})
    manifest.write_text(yaml.safe_dump(exp.model_copy(update={"kpis": (kpi_sd,)}).model_dump(mode="json")))
    checked = pilotlab("experiments", "validate", str(manifest), database_url=None)
    assert checked.returncode == 0 and "effect_below_mde" in checked.stdout, checked
