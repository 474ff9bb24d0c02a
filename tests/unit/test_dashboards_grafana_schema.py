"""Every dashboard is valid for the Grafana docker-compose runs, without a Grafana: against
Grafana's own dashboard schema (JSON Schema generated from the npm package @grafana/schema,
dashboards/schema/) and the rules that schema cannot express (dashboards/validate.py). A broken
panel, variable or query makes the validation fail."""

from __future__ import annotations

import copy
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml

from dashboards import build as dbuild
from dashboards import sdk, validate

REPO = Path(__file__).resolve().parents[2]
PROVISIONED = REPO / "deploy" / "grafana" / "dashboards"
SCHEMA_DIR = REPO / "dashboards" / "schema"
UIDS = ["pilotlab-overview", "pilotlab-experiment", "pilotlab-device-health", "pilotlab-pipeline"]


def provisioned_datasource_uids() -> set[str]:
    uids = set()
    for path in (REPO / "deploy" / "grafana" / "provisioning" / "datasources").glob("*.y*ml"):
        uids |= {ds["uid"] for ds in yaml.safe_load(path.read_text(encoding="utf-8")).get("datasources", [])}
    return uids


@pytest.fixture(scope="module")
def models() -> dict[str, dict]:
    return dbuild.build_all()


def findings(model: dict) -> list[validate.Finding]:
    return validate.findings(model, provisioned_datasource_uids())


@pytest.mark.parametrize("uid", UIDS)
def test_each_dashboard_is_valid_for_grafana(models, uid):
    problems = validate.problems(models[uid], provisioned_datasource_uids())
    assert not problems, f"{uid}: {len(problems)} findings\n" + "\n".join(problems)


@pytest.mark.parametrize("uid", UIDS)
def test_each_committed_dashboard_file_is_valid_for_grafana(uid):
    model = json.loads((PROVISIONED / f"{uid}.json").read_text(encoding="utf-8"))
    assert validate.problems(model, provisioned_datasource_uids()) == []


def test_the_schema_is_the_one_of_the_grafana_we_run():
    """The committed schema was generated from @grafana/schema at the version of docker-compose's
    Grafana image, and the builders write that Grafana's schemaVersion."""
    compose = (REPO / "docker-compose.yml").read_text(encoding="utf-8")
    (image_version,) = re.findall(r"image:\s*grafana/grafana:([0-9.]+)", compose)
    assert validate.grafana_version() == image_version
    package = json.loads((SCHEMA_DIR / "package.json").read_text(encoding="utf-8"))
    lock = json.loads((SCHEMA_DIR / "package-lock.json").read_text(encoding="utf-8"))
    assert package["devDependencies"]["@grafana/schema"] == image_version
    assert lock["packages"]["node_modules/@grafana/schema"]["version"] == image_version
    pinned = package["devDependencies"]
    assert all(re.fullmatch(r"\d+\.\d+\.\d+", v) for v in pinned.values()), f"tools not pinned exactly: {pinned}"
    meta = validate.schema()
    assert f"@grafana/schema {image_version}" in meta["$comment"]
    assert f"ts-json-schema-generator {pinned['ts-json-schema-generator']}" in meta["x-grafana"]["generator"]
    assert sdk.GRAFANA_SCHEMA_VERSION == validate.schema_version() == 39
    defs = meta["definitions"]
    assert {"Dashboard", "FieldConfig"} <= defs.keys()
    assert "$ref" not in json.dumps(defs), "every type is inlined (see generate.js)"
    for t in ("timeseries", "stat", "table", "barchart", "geomap"):
        assert f"PanelOptions_{t}" in defs, t
    # generated per type: each panel plugin's options are its own (one pass would merge them all)
    assert defs["PanelOptions_stat"] != defs["PanelOptions_table"]
    assert "reduceOptions" in defs["PanelOptions_stat"]["properties"]
    assert "cellHeight" in defs["PanelOptions_table"]["properties"]


def test_what_the_sdk_writes_unfixed_is_what_the_issue_found(monkeypatch):
    """grafana-foundation-sdk's own output, before sdk.for_grafana: "options": null on every
    panel with no option set, the top-level style, and the interval variable's fields (and a
    shared id) on every variable: all found, by the schema and by the rules."""
    monkeypatch.setattr(sdk, "for_grafana", lambda model: model)
    raw = dbuild.build_all()
    rules: Counter[str] = Counter()
    schema_paths = set()
    for model in raw.values():
        for f in findings(model):
            if f.check == "schema":
                schema_paths.add((model["uid"], f.path))
            else:
                rules[f.check] += 1
    null_options = sum(p["options"] is None for m in raw.values() for p in m["panels"])
    variables = sum(len(m.get("templating", {}).get("list", [])) for m in raw.values())
    assert (null_options, variables) == (25, 3)  # 21 + the four alert panels (overview, experiment detail)
    assert rules == {"panel-options": null_options, "no-style": 4, "schema-version": 4,
                     "variable-fields": 4 * variables}  # auto, auto_min, auto_count and id on each
    assert ("pilotlab-overview", "style") in schema_paths
    assert ("pilotlab-experiment", "templating.list[1].auto_min") in schema_paths
    assert ("pilotlab-experiment", "templating.list[1].id") in schema_paths
    assert ("pilotlab-pipeline", "panels[4].options") in schema_paths


def _panel(model: dict, title: str) -> dict:
    return next(p for p in model["panels"] if p["title"] == title)


def _set(path: str, value):
    """A mutation: set the value at a dotted path (``panels[0].options``) of a model."""
    def mutate(model: dict) -> None:
        *parents, last = re.findall(r"[^.\[\]]+", path)
        node = model
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        if last.isdigit():
            node[int(last)] = value
        else:
            node[last] = value
    return mutate


def _delete(path: str):
    def mutate(model: dict) -> None:
        *parents, last = re.findall(r"[^.\[\]]+", path)
        node = model
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        del node[last]
    return mutate


# (dashboard, mutation, where the finding must be, which checks must find it)
BROKEN = {
    "options null": ("pilotlab-pipeline", _set("panels[1].options", None), "panels[1].options",
                     {"schema", "panel-options"}),
    "a field Grafana does not have": ("pilotlab-pipeline", _set("panels[1].maxDataPoint", 500),
                                      "panels[1].maxDataPoint", {"schema"}),
    "panel type typo": ("pilotlab-pipeline", _set("panels[1].type", "time_series"), "panels[1].type", {"schema"}),
    "legacy graph panel": ("pilotlab-pipeline", _set("panels[1].type", "graph"), "panels[1].type", {"schema"}),
    "option out of its enum": ("pilotlab-experiment", _set("panels[0].options.colorMode", "rainbow"),
                               "panels[0].options.colorMode", {"schema"}),
    "option of another panel type": ("pilotlab-pipeline", _set("panels[4].options", {"reduceOptions": {}}),
                                     "panels[4].options.reduceOptions", {"schema"}),
    "option of the wrong type": ("pilotlab-pipeline", _set("panels[4].options", {"showHeader": "yes"}),
                                 "panels[4].options.showHeader", {"schema"}),
    "custom field config typo": ("pilotlab-pipeline", _set("panels[1].fieldConfig.defaults.custom",
                                                           {"lineWidht": 2}),
                                 "panels[1].fieldConfig.defaults.custom.lineWidht", {"schema"}),
    "override property typo": ("pilotlab-overview", _set("panels[2].fieldConfig.overrides[0].properties[1].id",
                                                         "custom.cellOption"),
                               "panels[2].fieldConfig.overrides[0].properties[1].id", {"schema"}),
    "override value of the wrong type": ("pilotlab-experiment",
                                         _set("panels[1].fieldConfig.overrides[1].properties[0].value", "three"),
                                         "panels[1].fieldConfig.overrides[1].properties[0].value", {"schema"}),
    "grid wider than 24 columns": ("pilotlab-pipeline", _set("panels[0].gridPos.w", 30), "panels[0].gridPos",
                                   {"grid"}),
    "overlapping panels": ("pilotlab-pipeline", _set("panels[4].gridPos", {"h": 9, "w": 16, "x": 0, "y": 13}),
                           "panels[4].gridPos", {"grid"}),
    "duplicate panel id": ("pilotlab-pipeline", _set("panels[2].id", 1), "panels[2].id", {"grid"}),
    "datasource by name": ("pilotlab-pipeline", _set("panels[1].datasource", "PilotLab TimescaleDB"),
                           "panels[1].datasource", {"schema", "datasource-uid"}),
    "datasource without uid": ("pilotlab-pipeline", _set("panels[1].targets[0].datasource",
                                                         {"type": "grafana-postgresql-datasource"}),
                               "panels[1].targets[0].datasource", {"datasource-uid"}),
    "unprovisioned datasource": ("pilotlab-device-health", _set("templating.list[0].datasource.uid", "other-db"),
                                 "templating.list[0].datasource.uid", {"datasource-uid"}),
    "query without refId": ("pilotlab-pipeline", _delete("panels[1].targets[0].refId"),
                            "panels[1].targets[0].refId", {"targets"}),
    "query without SQL": ("pilotlab-pipeline", _set("panels[1].targets[0].rawSql", " "),
                          "panels[1].targets[0].rawSql", {"targets"}),
    "query format typo": ("pilotlab-pipeline", _set("panels[1].targets[0].format", "timeseries"),
                          "panels[1].targets[0].format", {"targets"}),
    "style back": ("pilotlab-overview", _set("style", "dark"), "style", {"schema", "no-style"}),
    "interval field on a query variable": ("pilotlab-experiment", _set("templating.list[1].auto_count", 30),
                                           "templating.list[1].auto_count", {"schema", "variable-fields"}),
    "variable id": ("pilotlab-experiment", _set("templating.list[0].id", "00000000-0000-0000-0000-000000000000"),
                    "templating.list[0].id", {"schema", "variable-fields"}),
    "duplicate variable name": ("pilotlab-experiment", _set("templating.list[1].name", "experiment"),
                                "templating.list[1].name", {"variable-fields"}),
    "old schemaVersion": ("pilotlab-overview", _set("schemaVersion", 36), "schemaVersion", {"schema-version"}),
    "uid too long": ("pilotlab-overview", _set("uid", "pilotlab-" + "x" * 40), "uid", {"uid"}),
}


@pytest.mark.parametrize("case", BROKEN, ids=list(BROKEN))
def test_a_broken_dashboard_fails(models, case):
    uid, mutate, path, checks = BROKEN[case]
    model = copy.deepcopy(models[uid])
    assert findings(model) == []
    mutate(model)
    found = findings(model)
    assert found, f"{case}: no finding"
    assert {f.check for f in found if f.path == path} == checks, "\n".join(map(str, found))


def test_a_deliberately_broken_panel_fails_with_readable_findings(models):
    """One panel broken in several ways at once: each is reported at its place, with the title."""
    model = copy.deepcopy(models["pilotlab-experiment"])
    panel = _panel(model, "Impact verdict")
    panel["options"]["graphMode"] = "sparkline"
    panel["gridPos"]["x"] = 20
    panel["targets"][0]["datasource"] = {"uid": "mysql-db", "type": "mysql"}
    panel["legend"] = {"show": True}
    problems = validate.problems(model, provisioned_datasource_uids())
    joined = "\n".join(problems)
    assert "panels[0] ('Impact verdict').options.graphMode: \"sparkline\" is not one of" in joined
    assert "panels[0] ('Impact verdict').legend: 'legend' is not in Grafana 11.1.0's schema [schema]" in joined
    assert "panels[0] ('Impact verdict').gridPos: x=20 w=24" in joined
    assert "panels[0] ('Impact verdict').targets[0].datasource.uid: no provisioned datasource has uid 'mysql-db'" \
        in joined
    assert len(problems) == 4, joined


def test_an_interval_variable_may_have_its_auto_fields(models):
    model = copy.deepcopy(models["pilotlab-experiment"])
    model["templating"]["list"].append({
        "type": "interval", "name": "bucket", "query": "1m,10m,1h", "auto": True, "auto_min": "10s",
        "auto_count": 30, "refresh": 2,
    })
    assert findings(model) == []
    model["templating"]["list"][-1]["auto_count"] = "30"
    assert [(f.path, f.check) for f in findings(model)] == [("templating.list[2].auto_count", "variable-fields")]


def test_a_row_and_its_collapsed_panels_are_checked(models):
    model = copy.deepcopy(models["pilotlab-pipeline"])
    inner = copy.deepcopy(model["panels"][4])
    inner["options"] = None
    model["panels"].append({"type": "row", "id": 6, "title": "More", "collapsed": True,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": 22}, "panels": [inner]})
    inner["id"] = 7
    paths = {(f.path, f.check) for f in findings(model)}
    assert paths == {("panels[5].panels[0].options", "schema"), ("panels[5].panels[0].options", "panel-options")}


def test_the_lag_panel_needs_the_provisioned_prometheus(models):
    """The pipeline's consumer-lag panel reads the Prometheus docker-compose provisions; without
    that datasource the validation names the panel."""
    assert {"pilotlab-db", "pilotlab-prometheus"} <= provisioned_datasource_uids()
    problems = validate.problems(models["pilotlab-pipeline"], {"pilotlab-db"})
    assert problems and all("pilotlab-prometheus" in p for p in problems)
    assert any("Consumer lag per partition" in p for p in problems)
