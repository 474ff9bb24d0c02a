"""Several saturation runs of one system stand as one: the median (bench_e2e.median_saturation)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from bench import bench_e2e


def run(rows: float, kpis: float | None, *, stored: bool = True, tag: str = "") -> dict:
    r = {"name": "saturation", "tag": tag, "readings_datapoints_per_s": rows, "all_stored": stored,
         "readings_rate_partial": not stored}  # fmt: skip
    if kpis is not None:
        r.update(kpis_datapoints_per_s=kpis, kpis_complete=True, kpi={})
    return r


def test_one_run_is_itself():
    r = run(80_000, 70_000)
    assert bench_e2e.median_saturation([r]) is r
    assert bench_e2e.repeats_note(r) == ""


def test_each_throughput_is_the_median_and_the_rest_comes_from_the_median_run():
    runs = [run(90_000, 60_000, tag="a"), run(70_000, 75_000, tag="b"), run(80_000, 80_000, tag="c")]
    m = bench_e2e.median_saturation(runs)
    assert m["readings_datapoints_per_s"] == 80_000 and m["tag"] == "c"  # CPU etc. of the median run
    assert m["kpis_datapoints_per_s"] == 75_000  # the KPIs' own median, not run c's
    assert [x["readings_datapoints_per_s"] for x in m["repeats"]] == [90_000, 70_000, 80_000]  # run order
    assert bench_e2e.repeats_note(m) == "median of 3: 90,000 / 70,000 / 80,000"
    assert bench_e2e.repeats_note(m, "kpis_datapoints_per_s") == "median of 3: 60,000 / 75,000 / 80,000"
    assert runs[2]["readings_datapoints_per_s"] == 80_000 and "repeats" not in runs[2]  # inputs untouched


def test_an_even_count_takes_the_lower_middle():
    m = bench_e2e.median_saturation([run(100, None), run(300, None)])
    assert m["readings_datapoints_per_s"] == 100
    assert "kpis_datapoints_per_s" not in m  # a peer has no KPIs


def test_one_run_that_did_not_store_everything_marks_the_whole():
    m = bench_e2e.median_saturation([run(90_000, 1, stored=False), run(80_000, 1), run(85_000, 1)])
    assert m["readings_datapoints_per_s"] == 85_000
    assert m["all_stored"] is False and m["readings_rate_partial"] is True


def test_round_ratios_pair_the_bursts_of_each_round():
    pilot = [run(80_000, 1), run(60_000, 1), run(90_000, 1)]
    peer = [run(100_000, None), run(100_000, None), run(120_000, None)]
    assert bench_e2e.round_ratios(pilot, peer) == [0.8, 0.6, 0.75]
    # a missing figure or a round one side did not run gives no ratio for it, not a shifted pair
    assert bench_e2e.round_ratios([run(80_000, 1), run(None, 1)], [run(100_000, None), run(50_000, None)]) == [
        0.8,
        None,
    ]
    assert bench_e2e.round_ratios(pilot, peer[:2]) == [0.8, 0.6]


def _record_phases(monkeypatch) -> tuple[list[str], dict]:
    """bench_e2e's phase functions replaced by ones that record their calls (no stack, no load)."""
    calls: list[str] = []
    seen: dict = {}
    bursts = iter(range(100))

    @contextlib.contextmanager
    def window(_b):
        calls.append("up")
        yield
        calls.append("down")

    def saturation(_b, n):
        out = []
        for _ in range(n):
            i = next(bursts)
            calls.append(f"pilot {i}")
            out.append(run(80_000 + i, 1))
        return out

    def peer_round(_b, _only, runs):
        calls.append("peers")
        runs.setdefault("peer", []).append(run(100_000, None))

    def step(_b, _phases, _reserve, *, peers_rounds_done=False):
        calls.append(f"step (peers' rounds done: {peers_rounds_done})")
        return {}

    def peers(_b, _res, _only, *, saturation, pilot_runs):
        calls.append("peers' fixed loads")
        seen.update(saturation=saturation, pilot_runs=pilot_runs)
        return {}

    monkeypatch.setattr(bench_e2e, "pipeline_window", window)
    monkeypatch.setattr(bench_e2e, "measure_idle", lambda _b, _s: calls.append("idle") or {})
    monkeypatch.setattr(bench_e2e, "phase_fixed", lambda _b: calls.append("fixed") or [])
    monkeypatch.setattr(bench_e2e, "phase_saturation", saturation)
    monkeypatch.setattr(bench_e2e, "peer_saturation_round", peer_round)
    monkeypatch.setattr(bench_e2e, "run_step", step)
    monkeypatch.setattr(bench_e2e, "phase_peers", peers)
    return calls, seen


def test_with_peers_the_bursts_alternate_by_round_and_the_step_load_comes_last(monkeypatch):
    calls, seen = _record_phases(monkeypatch)
    b = bench_e2e.Bench(cfg=bench_e2e.Config(saturation_repeats=3), state=None, tmp=Path("."))
    res: dict = {}
    bench_e2e.pipeline_phases(b, res, ["fixed", "step", "saturation", "peers"], None, 0.0)
    assert calls == [
        "up", "idle", "fixed", "pilot 0", "down", "peers",
        "up", "pilot 1", "down", "peers",
        "up", "pilot 2", "down", "peers",
        "up", "step (peers' rounds done: True)", "down",
        "peers' fixed loads",
    ]  # fmt: skip
    assert [r["readings_datapoints_per_s"] for r in seen["pilot_runs"]] == [80_000, 80_001, 80_002]
    assert len(seen["saturation"]["peer"]) == 3
    assert res["saturation"]["readings_datapoints_per_s"] == 80_001  # the median of pilotlab's three
    assert {"services_up_and_warm_up", "fixed", "saturation", "peers_saturation_3", "peers"} <= set(b.timings)


def test_without_peers_the_order_is_the_old_one(monkeypatch):
    calls, _seen = _record_phases(monkeypatch)
    b = bench_e2e.Bench(cfg=bench_e2e.Config(saturation_repeats=3), state=None, tmp=Path("."))
    res: dict = {}
    bench_e2e.pipeline_phases(b, res, ["fixed", "step", "saturation"], None, 0.0)
    assert calls == ["up", "idle", "fixed", "pilot 0", "pilot 1", "pilot 2", "step (peers' rounds done: False)", "down"]
