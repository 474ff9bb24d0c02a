"""The dashboards' JSON models: stable UIDs, the panels the issue asks for, every query on the
provisioned datasource, the committed files (deploy/grafana/dashboards, the one copy of the
built models, compared here and never written), and the push payload. Their validity for
Grafana: test_dashboards_grafana_schema.py."""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest

from dashboards import build as dbuild
from dashboards.checks import prom_metric_names, prom_targets, result_problems, stat_fields, targets
from dashboards.sdk import DATASOURCE_UID, PROMETHEUS_UID

REPO = Path(__file__).resolve().parents[2]
PROVISIONED = REPO / "deploy" / "grafana" / "dashboards"
REBUILD = "make dashboards (pilotlab dashboards build --out deploy/grafana/dashboards)"
UIDS = ["pilotlab-overview", "pilotlab-experiment", "pilotlab-device-health", "pilotlab-pipeline"]


@pytest.fixture(scope="module")
def models() -> dict[str, dict]:
    return dbuild.build_all()


def test_four_dashboards_with_stable_uids(models):
    assert list(models) == UIDS
    assert [m["uid"] for m in models.values()] == UIDS
    assert all(m["title"].startswith("PilotLab · ") for m in models.values())


def test_the_panel_types_the_lab_needs(models):
    types = {p["type"] for m in models.values() for p in m["panels"]}
    assert {"timeseries", "stat", "table", "geomap", "barchart"} <= types
    detail = models["pilotlab-experiment"]
    assert [v["name"] for v in detail["templating"]["list"]] == ["experiment", "kpi"]
    assert "geomap" in {p["type"] for p in detail["panels"]}
    assert [v["name"] for v in models["pilotlab-device-health"]["templating"]["list"]] == ["experiment"]


def test_every_query_uses_the_provisioned_datasource_and_the_right_format(models):
    for model in models.values():
        ids = [p["id"] for p in model["panels"]]
        assert ids == list(range(1, len(ids) + 1))
        for panel, target in targets(model):
            assert panel["datasource"]["uid"] == target["datasource"]["uid"]
            if target["datasource"]["uid"] == PROMETHEUS_UID:  # the services' own metrics
                assert target["datasource"]["type"] == "prometheus" and target["expr"].strip(), panel["title"]
                assert panel["type"] == "timeseries" and target["format"] == "time_series", panel["title"]
                continue
            assert target["datasource"]["uid"] == DATASOURCE_UID
            assert target["rawQuery"] is True and target["rawSql"].strip()
            want = "time_series" if panel["type"] == "timeseries" else "table"
            assert target["format"] == want, panel["title"]
        for var in model.get("templating", {}).get("list", []):
            assert var["datasource"]["uid"] == DATASOURCE_UID


def test_panels_use_template_variables_not_literals(models):
    for uid in ("pilotlab-experiment", "pilotlab-device-health"):
        for panel, target in targets(models[uid]):
            assert "'$experiment'" in target["rawSql"], panel["title"]


def test_building_twice_gives_the_same_bytes(models):
    again = dbuild.build_all()
    assert [dbuild.dumps(m) for m in again.values()] == [dbuild.dumps(m) for m in models.values()]


def test_committed_dashboards_are_the_current_build(models):
    """deploy/grafana/dashboards/*.json (what docker-compose provisions) must be what dashboards/
    builds now: a change to a builder fails here until the files are rebuilt, reviewed and
    committed with it. This test only reads them."""
    built = {f"{uid}.json": dbuild.dumps(model) for uid, model in models.items()}
    committed = {p.name: p.read_text(encoding="utf-8") for p in sorted(PROVISIONED.glob("*.json"))}
    problems = []
    for name in sorted(built.keys() | committed.keys()):
        if name not in committed:
            problems.append(f"{name}: built, not committed")
        elif name not in built:
            problems.append(f"{name}: committed, but dashboards/ builds no such dashboard")
        elif committed[name] != built[name]:
            diff = list(difflib.unified_diff(committed[name].splitlines(keepends=True),
                                             built[name].splitlines(keepends=True),
                                             f"deploy/grafana/dashboards/{name} (committed)", f"{name} (built)", n=2))
            cut = "" if len(diff) <= 60 else f"... {len(diff) - 60} more diff lines\n"
            problems.append("".join(diff[:60]) + cut)
    assert not problems, "\n".join(problems) + f"\nIf the change is intended: {REBUILD}, review the diff, commit it."


def test_the_build_command_writes_exactly_the_models(tmp_path, models):
    """What ``pilotlab dashboards build --out DIR`` writes (into a temporary directory here) is
    what the test above compares the committed files with."""
    written = dbuild.write(tmp_path)
    assert sorted(p.name for p in written) == sorted(f"{uid}.json" for uid in models)
    for p in written:
        assert p.read_text(encoding="utf-8") == dbuild.dumps(models[p.stem])


def test_upsert_payload_replaces_by_uid(models):
    payload = dbuild.upsert_payload({**models["pilotlab-overview"], "id": 42})
    assert payload["overwrite"] is True
    assert payload["folderUid"] == dbuild.FOLDER_UID
    assert payload["dashboard"]["uid"] == "pilotlab-overview"
    assert "id" not in payload["dashboard"]


def test_result_checker_refuses_what_a_panel_cannot_draw():
    t = __import__("datetime").datetime(2026, 3, 1, tzinfo=__import__("datetime").UTC)
    assert result_problems("timeseries", "time_series", ["time", "metric", "v"], [(t, "treatment", 1.0)]) == []
    assert result_problems("timeseries", "table", ["time", "v"], [(t, 1.0)]) == ["format is 'table', not 'time_series'"]
    assert "no column named time" in result_problems("timeseries", "time_series", ["ts", "v"], [(t, 1.0)])
    assert "no numeric value column" in result_problems("timeseries", "time_series", ["time", "m"], [(t, "x")])
    assert result_problems("stat", "table", ["a"], []) == ["no rows"]
    assert result_problems("stat", "table", ["a"], [("x",)]) == ["no numeric column"]
    assert result_problems("geomap", "table", ["lat", "lon"], [(45.0, 7.6)]) == [
        "no numeric latitude column", "no numeric longitude column"]
    assert result_problems("barchart", "table", ["n"], [(3,)]) == ["no text or time column for the x axis"]
    assert result_problems("barchart", "table", ["reason", "n"], [("wrong_type", 3)]) == []
    # a stat of text values (the impact verdict): the column its fields option picks
    assert result_problems("stat", "table", ["impact", "verdict"], [("no2_impact: -25.0%", "improved")],
                           fields="/^verdict$/") == []
    assert result_problems("stat", "table", ["impact", "v"], [("x", "improved")], fields="/^verdict$/") == [
        "no column matches the fields option '/^verdict$/'"]
    assert result_problems("stat", "table", ["verdict"], [(None,)], fields="verdict") == [
        "the column picked by 'verdict' holds no number or text"]


def test_impact_panels_show_verdict_devices_warnings_and_the_scale(models):
    """Every impact panel shows the stored verdict (coloured), devices per group and warnings,
    and never multiplies an absolute (unit) estimate by 100 as a percentage."""
    detail = {p["title"]: p for p in models["pilotlab-experiment"]["panels"]}
    stat_sql = detail["Impact verdict"]["targets"][0]["rawSql"]
    assert stat_fields(detail["Impact verdict"]) == "/^verdict$/" and "'devices'" in stat_sql
    table_sql = detail["Impact with its 95% confidence interval"]["targets"][0]["rawSql"]
    for col in ('AS verdict', 'AS "treatment devices"', 'AS "control devices"', "AS unit", "AS placebo",
                "AS method", "AS design"):
        assert col in table_sql
    assert "CASE WHEN details->>'scale' = 'absolute' THEN (details->>'estimate')::float8 ELSE 100 *" in table_sql
    warnings_sql = detail["Impact warnings"]["targets"][0]["rawSql"]
    assert "jsonb_array_elements_text(i.details->'warnings')" in warnings_sql
    overview = {p["title"]: p for p in models["pilotlab-overview"]["panels"]}["Experiments"]
    sql = overview["targets"][0]["rawSql"]
    assert "AS verdict" in sql and 'AS "impact devices"' in sql and "AS warnings" in sql
    for panel in (overview, detail["Impact with its 95% confidence interval"], detail["Impact warnings"]):
        names = [o["matcher"]["options"] for o in panel["fieldConfig"]["overrides"]]
        assert "verdict" in names, panel["title"]


def test_pipeline_lag_comes_from_the_services_metrics(models):
    """Consumer lag per partition from Prometheus (the streams worker's and the sink's lag
    gauges), not the database proxy it replaced (received_at − ts); the integration test
    test_service_metrics checks that the services export these names."""
    pipeline = models["pilotlab-pipeline"]
    queries = list(prom_targets(pipeline))
    assert {p["title"] for p, _ in queries} == {"Consumer lag per partition (records)"}
    read = set().union(*(prom_metric_names(t["expr"]) for _, t in queries))
    assert read == {"pilotlab_streams_lag_records", "pilotlab_sink_lag_records"}
    assert all("by (topic, partition)" in t["expr"] and "{{partition}}" in t["legendFormat"] for _, t in queries)
    assert not [t for _, t in targets(pipeline) if "received_at - ts" in t.get("rawSql", "")]
    # every other dashboard stays on the database
    for uid, model in models.items():
        if uid != "pilotlab-pipeline":
            assert not list(prom_targets(model)), uid
