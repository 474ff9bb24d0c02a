"""The end-to-end benchmark harness (bench/bench_e2e.py) runs in its quick mode on tiny loads
and writes a JSON and a markdown report with every figure; every datapoint published in every
run is stored (and counted by the count KPI): a lost row fails the test. No timing is asserted
(the figures are the benchmark's business); only that they were measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]


def _figure(value) -> bool:
    return isinstance(value, int | float) and value > 0


def test_quick_run_measures_everything_and_loses_nothing(tmp_path: Path):
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_e2e.py"), "--quick", "--out-dir", str(out),
         "--phases", "ceilings,fixed,step,saturation,peers", "--peers", "paho-insert",
         "--fixed-rates", "600", "--steps", "600,1200", "--saturation-datapoints", "3000"],
        capture_output=True, text=True, timeout=540, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs, reports = list(out.glob("e2e-quick-*.json")), list(out.glob("e2e-quick-*.md"))
    assert len(runs) == 1 and len(reports) == 1
    res = json.loads(runs[0].read_text())
    assert reports[0].read_text().startswith("# pilotlab end-to-end benchmark")
    # latest-quick.md points at the run's files, and is no second copy of its figures
    pointer = (out / "latest-quick.md").read_text()
    assert f"]({runs[0].name})" in pointer and f"]({reports[0].name})" in pointer
    assert sorted(p.name for p in out.iterdir()) == sorted([runs[0].name, reports[0].name, "latest-quick.md"])
    assert not (out / "latest.md").exists()  # a quick run never replaces a full run's pointer

    m = res["machine"]
    assert m["cores"] >= 1 and m["cpu"] and m["mosquitto"] and m["tansu"] and m["postgres"]

    c = res["ceilings"]
    for key in ("mqtt_pubsub_datapoints_per_s", "kafka_produce_datapoints_per_s", "kafka_consume_datapoints_per_s",
                "postgres_raw_copy_rows_per_s", "postgres_sink_copy_merge_rows_per_s"):  # fmt: skip
        assert _figure(c[key]), key

    runs = [*res["fixed"], *res["step"]["steps"], res["saturation"]]
    names = [r["name"] for r in runs]
    assert names[:2] == ["fixed-600", "step-600"] and names[-1] == "saturation", names  # step-1200 if 600 kept up
    for r in runs:
        expected = r["load"]["messages"] * res["config"]["per_message"]
        assert r["published_datapoints"] == expected > 0, r["name"]
        assert r["stored_datapoints"] == expected, f"{r['name']}: rows lost or duplicated"
        assert r["all_stored"] and r["kpis_complete"], r["name"]
        assert r["kpi"]["counted"] == r["kpi"]["expected"] == r["load"]["messages"] * res["config"]["readings"]
        # one stored_at latency per message (every row has stored_at)
        assert r["latency_s"]["n"] == r["load"]["messages"], r["name"]
        for q in ("p50", "p95", "p99"):
            assert r["latency_s"][q] is not None and r["latency_s"][q] > 0, (r["name"], q)
        cores = r["cpu"]["cores_busy"]
        for proc in ("ingest", "streams", "sink", "mosquitto", "tansu", "postgres", "publisher"):
            assert proc in cores, (r["name"], proc)
        if r["name"] != "saturation":  # a few seconds of load; the tiny saturation run can take under a clock tick
            assert cores["ingest"] > 0 and cores["postgres"] > 0, r["name"]
    for r in res["fixed"]:
        assert r["kpi"]["lag_s"]["p50"] is not None
    assert set(res["idle"]["cpu"]["cores_busy"]) >= {"ingest", "streams", "sink", "tansu", "postgres"}
    assert _figure(res["saturation"]["readings_datapoints_per_s"]) and not res["saturation"]["readings_rate_partial"]
    assert _figure(res["saturation"]["kpis_datapoints_per_s"])

    (peer,) = res["peers"]["runs"]
    assert peer["peer"] == "paho-insert" and "error" not in peer, peer.get("error")
    for r in (peer["fixed"], peer["saturation"]):
        assert r["stored_datapoints"] == r["published_datapoints"] > 0, f"{r['name']}: rows lost"
    assert _figure(peer["ratio_throughput_pilotlab_to_peer"]) and _figure(peer["ratio_latency_p50_peer_to_pilotlab"])
    # the bursts alternated (one round here): the round's ratio is pilotlab's burst over the peer's
    assert res["peers"]["interleaved"] is True
    assert peer["ratio_throughput_by_round"] == [
        pytest.approx(res["saturation"]["readings_datapoints_per_s"] / peer["saturation"]["readings_datapoints_per_s"])
    ]
    assert set(res["timings"]) >= {"stack_up", "ceilings", "fixed", "step", "saturation", "peers", "total"}

    # the default storage "both": the last fixed load and the saturation again on the durable broker
    assert res["config"]["kafka_storage"] == "both"
    d = res["durable"]
    assert [r["name"] for r in d["fixed"]] == ["fixed-600"] and d["saturation"]["name"] == "saturation"
    for r in (*d["fixed"], d["saturation"]):
        assert r["stored_datapoints"] == r["published_datapoints"] > 0, f"durable {r['name']}: rows lost"
        assert r["kpis_complete"] and "objects" in r["cpu"]["cores_busy"], r["name"]
    assert "durable_broker" in res["timings"]
    text = reports[0].read_text()
    assert "## Against the efficiency goals" in text and "## Durable broker" in text
