"""``pilotlab export``: an experiment's readings, KPIs and rejections as CSV and Parquet from the
real database, with the manifest and the stored impact beside them; the exported readings give
the same impact as the stored ones (a researcher can redo the analysis)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import psycopg
import pyarrow.parquet as pq
import pytest
import yaml

from pilotlab.contracts import KpiValue, Reading, ReadingBatch, Reason, Rejection, to_ms
from pilotlab.manifest import Experiment
from simulators.synthetic import PilotSpec, generate
from storage.writer import write_experiments, write_kpis, write_readings, write_rejections
from streams.impact import estimate_impact

pytestmark = pytest.mark.integration

SPEC = PilotSpec("export-pilot", 3, 3, interval_s=3600, effect=-0.2)


def pilotlab(stack_state, *args: str) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PILOTLAB_")}, **stack_state.env()}
    return subprocess.run([sys.executable, "-m", "control", *args], capture_output=True, text=True, env=env,
                          timeout=120, check=False)  # fmt: skip


@pytest.fixture(scope="module")
def stored(stack_state) -> tuple[Experiment, list[tuple[str, int, float]]]:
    exp, readings = generate(SPEC, 3)
    group = {d.id: d.group for d in exp.devices}
    result = estimate_impact(exp, "impact", readings)
    with psycopg.connect(stack_state.database_url) as conn:
        write_experiments(conn, [exp])
        write_readings(conn, [ReadingBatch(exp.id, dev, group[dev], ts + 1000, (Reading(i, ts, {"no2": v}),))
                              for i, (dev, ts, v) in enumerate(readings)])  # fmt: skip
        start = to_ms(exp.periods.baseline.start)
        write_kpis(conn, [KpiValue(exp.id, "impact", "no2", "impact", "all", 28 * 86400, start, result.estimate,
                                   len(readings), 1, result.as_dict())])  # fmt: skip
        write_rejections(conn, [Rejection(Reason.WRONG_TYPE, "no2 is not a number", "pilots/x/t00/telemetry",
                                          start + 5000, exp.id, "t00", None, '{"no2": "high"}', "rej-1")])  # fmt: skip
        conn.commit()
    return exp, readings


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_export_gives_back_every_row_and_the_same_impact(stack_state, stored, tmp_path: Path, fmt: str) -> None:
    exp, readings = stored
    out = pilotlab(stack_state, "export", exp.id, "--out", str(tmp_path), "--format", fmt)
    assert out.returncode == 0, out.stderr
    if fmt == "csv":
        with (tmp_path / "readings.csv").open() as f:
            rows = [(r["device_id"], to_ms(datetime.fromisoformat(r["ts"])), float(r["value"]))
                    for r in csv.DictReader(f)]  # fmt: skip
        with (tmp_path / "rejections.csv").open() as f:
            rejections = [r["reason"] for r in csv.DictReader(f)]
        with (tmp_path / "kpis.csv").open() as f:
            kpis = list(csv.DictReader(f))
    else:
        table = pq.read_table(tmp_path / "readings.parquet").to_pylist()
        rows = [(r["device_id"], to_ms(r["ts"]), r["value"]) for r in table]
        rejections = [r["reason"] for r in pq.read_table(tmp_path / "rejections.parquet").to_pylist()]
        kpis = pq.read_table(tmp_path / "kpis.parquet").to_pylist()
    assert sorted(rows) == sorted(readings)
    assert rejections == ["wrong_type"]
    assert [k["kpi"] for k in kpis] == ["impact"] and json.loads(kpis[0]["details"])["verdict"]
    manifest = Experiment.model_validate(yaml.safe_load((tmp_path / "manifest.yaml").read_text()))
    assert manifest == exp
    (impact,) = json.loads((tmp_path / "impact.json").read_text())
    redone = estimate_impact(manifest, "impact", rows)
    assert redone.estimate == pytest.approx(impact["estimate"]) == pytest.approx(impact["details"]["estimate"])
    assert redone.verdict == impact["details"]["verdict"]


def test_time_range_and_refusals(stack_state, stored, tmp_path: Path) -> None:
    exp, readings = stored
    start = exp.periods.intervention.start
    end = start + timedelta(days=1)
    out = pilotlab(stack_state, "export", exp.id, "--out", str(tmp_path), "--table", "readings",
                   "--from", start.isoformat(), "--to", end.isoformat().replace("+00:00", "Z"))  # fmt: skip
    assert out.returncode == 0, out.stderr
    with (tmp_path / "readings.csv").open() as f:
        got = sorted((r["device_id"], to_ms(datetime.fromisoformat(r["ts"]))) for r in csv.DictReader(f))
    want = sorted((d, t) for d, t, _ in readings if to_ms(start) <= t < to_ms(end))
    assert got == want and len(want) == 6 * 24
    assert not (tmp_path / "kpis.csv").exists()
    for args, message in (
        (["nope", "--out", str(tmp_path)], "no experiment 'nope'"),
        ([exp.id, "--out", str(tmp_path), "--format", "xlsx"], "--format must be csv or parquet"),
        ([exp.id, "--out", str(tmp_path), "--from", "2026-03-01T00:00:00"], "has no time zone"),
        ([exp.id, "--out", str(tmp_path), "--table", "devices"], "unknown --table devices"),
    ):
        bad = pilotlab(stack_state, "export", *args)
        assert bad.returncode == 1 and message in bad.stderr, bad
