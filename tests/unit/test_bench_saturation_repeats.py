"""Several saturation runs of one system stand as one: the median (bench_e2e.median_saturation)."""

from __future__ import annotations

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
