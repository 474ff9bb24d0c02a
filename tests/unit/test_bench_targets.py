"""The end-to-end report measures each run against the efficiency goals (bench/bench_e2e.py,
``targets_table``): what it reads from a run and when it calls a goal met."""

from __future__ import annotations

from bench import bench_e2e


def fixed(rate: int, tansu: float, p99: float, objects: float | None = None) -> dict:
    cores = {"tansu": tansu, **({"objects": objects} if objects is not None else {})}
    return {"load": {"target_datapoints_per_s": rate}, "cpu": {"cores_busy": cores}, "latency_s": {"p99": p99}}


def run(*, sustained: int, behind: int | None, saturation: float, ratio_nodered: float, durable: dict | None = None):
    return {
        "fixed": [fixed(1000, 0.05, 0.2), fixed(10_000, 0.15, 0.45)],
        "step": {
            "sustained_readings_datapoints_per_s": sustained,
            "sustained_kpis_datapoints_per_s": sustained,
            "first_step_behind_readings": behind,
            "first_step_behind_kpis": behind,
        },
        "saturation": {"readings_datapoints_per_s": saturation, "kpis_datapoints_per_s": saturation},
        "peers": {
            "runs": [
                {"peer": "nodered", "ratio_throughput_pilotlab_to_peer": ratio_nodered},
                {"peer": "nodered-batched", "ratio_throughput_pilotlab_to_peer": 0.5},
                {"peer": "paho-insert", "ratio_throughput_pilotlab_to_peer": 3.0},
            ]
        },
        **({"durable": durable} if durable else {}),
    }


def lines(res: dict) -> dict[str, list[str]]:
    out = {}
    for line in bench_e2e.targets_table(res)[4:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4:
            out[cells[0]] = cells[1:]
    return out


def test_each_goal_is_read_from_its_run_and_judged():
    got = lines(run(sustained=60_000, behind=70_000, saturation=64_000, ratio_nodered=1.3))
    assert got["broker cores at 10,000 dp/s (memory: tansu)"] == ["0.15", "≤ 0.2", "yes"]
    assert got["p99 publish → stored at 10,000 dp/s (memory)"] == ["450 ms", "≤ 500 ms", "yes"]
    assert got["sustained to `readings` (memory)"] == ["60,000", "≥ 60,000", "yes"]
    assert got["no step behind below saturation (64,000 dp/s to readings)"][2] == "yes"
    assert got["pilotlab / nodered saturation throughput"] == ["1.30", "≥ 1.2", "yes"]
    assert got["pilotlab / nodered-batched saturation throughput"] == ["0.50", "≥ 0.75", "**no**"]
    assert not any("paho-insert" in k for k in got)  # no goal set against it


def test_a_step_behind_below_saturation_and_a_short_sustained_figure_are_not_met():
    got = lines(run(sustained=40_000, behind=50_000, saturation=55_000, ratio_nodered=1.0))
    assert got["sustained to `kpi_values` (memory)"][2] == "**no**"
    assert got["no step behind below saturation (55,000 dp/s to kpis)"] == [
        "first behind: 50,000",
        "none below saturation",
        "**no**",
    ]
    assert got["pilotlab / nodered saturation throughput"][2] == "**no**"


def test_the_durable_broker_counts_its_object_server():
    durable = {"fixed": [fixed(10_000, 0.12, 0.6, objects=0.1)]}
    got = lines(run(sustained=60_000, behind=None, saturation=61_000, ratio_nodered=1.3, durable=durable))
    assert got["broker cores at 10,000 dp/s (durable: tansu + object server)"] == ["0.22", "≤ 0.2", "**no**"]
    assert got["p99 publish → stored at 10,000 dp/s (durable)"][2] == "**no**"
    assert got["no step behind below saturation (61,000 dp/s to readings)"][2] == "yes"  # none behind at all


def test_no_runs_no_table():
    assert bench_e2e.targets_table({}) == []
