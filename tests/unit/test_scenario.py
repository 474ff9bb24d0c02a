"""Scenario files: validation errors name the file and the field; manifests are referenced
or embedded; device counts, intervals and true effects are applied; periods are anchored."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from simulators.spec import ScenarioError, load_scenario, parse_scenario

REPO = Path(__file__).resolve().parents[2]
SCENARIOS = REPO / "control" / "examples" / "scenarios"

EMBEDDED = {
    "id": "tiny",
    "title": "tiny",
    "startup": "T",
    "district": "D",
    "location": {"lat": 45.07, "lon": 7.68},
    "periods": {
        "baseline": {"start": "2026-03-01T00:00:00Z", "end": "2026-03-02T00:00:00Z"},
        "intervention": {"start": "2026-03-02T00:00:00Z", "end": "2026-03-03T00:00:00Z"},
    },
    "devices": [{"id": "n-1", "kind": "noise", "interval": "1m"}],
    "kpis": [{"name": "noise_mean", "metric": "noise", "kind": "mean"}],
}


def write(tmp_path: Path, doc: dict, name: str = "s.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(doc))
    return p


@pytest.mark.parametrize("path", sorted(SCENARIOS.glob("*.yaml")), ids=lambda p: p.name)
def test_example_scenarios_load(path: Path):
    s = load_scenario(path)
    assert s.resolved and s.span() > timedelta(0)


def test_device_counts_interval_and_effects_are_applied():
    s = load_scenario(SCENARIOS / "lighting-faults.yaml")
    (exp,) = s.resolved
    groups = [d.group for d in exp.devices]
    assert groups.count("treatment") == 20 and groups.count("control") == 20
    assert {d.interval for d in exp.devices} == {300}
    assert {d.kind for d in exp.devices} == {"street_light"}
    assert exp.simulation.true_effects == {"energy": -0.30}


def test_periods_are_rescaled_onto_the_window_ending_at_the_anchor():
    s = load_scenario(SCENARIOS / "lighting-faults.yaml")
    anchor = datetime(2026, 5, 1, 12, tzinfo=UTC)
    (exp,) = s.anchored(anchor)
    assert exp.periods.intervention.end == anchor
    assert exp.periods.baseline.start == anchor - timedelta(days=2)
    assert exp.periods.intervention.start == anchor - timedelta(days=1)  # the manifest's halves


def test_embedded_manifest_and_zero_outage_start(tmp_path):
    doc = {
        "name": "emb",
        "experiments": [{"experiment": EMBEDDED}],
        "faults": {"dropout": {"outages": [{"devices": ["n-1"], "start": 0, "duration": "1h"}]}},
    }
    s = load_scenario(write(tmp_path, doc))
    assert s.resolved[0].id == "tiny" and s.faults.dropout.outages[0].start == 0
    assert s.span() == timedelta(days=2)


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"name": "x", "experiments": [{"experiment": EMBEDDED}], "seed": "abc"}, "seed"),
        ({"name": "x", "experiments": [{"experiment": EMBEDDED}], "faults": {"duplicates": 1.5}}, "faults.duplicates"),
        ({"name": "x", "experiments": [{"experiment": EMBEDDED}], "faults": {"late": {"rate": 0.1, "delay": "soon"}}},
         "faults.late.delay"),
        ({"name": "x", "experiments": [{"experiment": EMBEDDED}], "speed": 0.5}, "speed"),
        ({"name": "x", "experiments": [{"experiment": EMBEDDED}], "fautls": {}}, "fautls"),
        ({"name": "x", "experiments": []}, "experiments"),
        ({"name": "x", "experiments": [{"manifest": "a.yaml", "experiment": EMBEDDED}]}, "experiments.0"),
        ({"name": "x", "experiments": [{"experiment": {**EMBEDDED, "kpis": []}}]}, "experiments.0.experiment.kpis"),
        ({"name": "x", "experiments": [{"experiment": EMBEDDED, "true_effects": {"noise": "big"}}]},
         "experiments.0.true_effects.noise"),
        ({"name": "x", "experiments": [{"experiment": EMBEDDED}],
          "faults": {"clock_skew": {"devices": 0.1, "offset": "-2x"}}}, "faults.clock_skew"),
    ],
)
def test_errors_name_the_file_and_the_field(tmp_path, doc, field):
    path = write(tmp_path, doc)
    with pytest.raises(ScenarioError) as err:
        load_scenario(path)
    msg = str(err.value)
    assert str(path) in msg
    assert f"  {field}" in msg, msg


def test_missing_manifest_names_scenario_and_manifest(tmp_path):
    path = write(tmp_path, {"name": "x", "experiments": [{"manifest": "nope.yaml"}]})
    with pytest.raises(ScenarioError, match=r"s\.yaml: experiments\.0\.manifest: .*nope\.yaml: cannot read"):
        load_scenario(path)


def test_device_ids_unique_across_experiments(tmp_path):
    other = {**EMBEDDED, "id": "tiny-2"}
    path = write(tmp_path, {"name": "x", "experiments": [{"experiment": EMBEDDED}, {"experiment": other}]})
    with pytest.raises(ScenarioError, match="device ids in two experiments: n-1"):
        load_scenario(path)


def test_negative_clock_skew_and_not_a_mapping(tmp_path):
    s = parse_scenario({"name": "x", "experiments": [{"experiment": EMBEDDED}],
                        "faults": {"clock_skew": {"devices": 0.5, "offset": "-2h"}}})
    assert s.faults.clock_skew.offset == -7200
    with pytest.raises(ScenarioError, match="a scenario is a YAML mapping"):
        load_scenario(write(tmp_path, [1, 2]))  # type: ignore[arg-type]


def test_a_manifests_simulated_outages_are_left_to_the_scenarios_faults(tmp_path):
    manifest = REPO / "control" / "examples" / "experiments" / "lez-san-salvario.yaml"
    assert yaml.safe_load(manifest.read_text())["simulation"]["outages"]  # the demo's outage
    for extra in ({}, {"devices": {"treatment": 3, "control": 3}, "interval": "5m"}):  # generated devices too
        doc = {"name": "lez", "seed": 1, "duration": "2d", "experiments": [{"manifest": str(manifest), **extra}]}
        (exp,) = load_scenario(write(tmp_path, doc)).resolved
        assert exp.simulation.outages == ()
        assert exp.simulation.true_effects == {"no2": -0.25, "pm25": -0.10}
