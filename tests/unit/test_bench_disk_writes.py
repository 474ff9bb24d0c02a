"""The benchmark's disk-write accounting (bench.e2e.cpu.tree_usage, CpuMeter) and its table:
bytes a process tree caused to be written, per published datapoint."""

from __future__ import annotations

import subprocess
import sys

from bench import bench_e2e
from bench.e2e.cpu import CpuMeter, tree_usage


def test_a_child_that_writes_and_fsyncs_is_counted_in_its_root_tree(tmp_path):
    target = tmp_path / "blob"
    code = (
        "import os, sys, time\n"
        f"f = open({str(target)!r}, 'wb'); f.write(b'x' * 4_000_000); f.flush(); os.fsync(f.fileno())\n"
        "print('written', flush=True); sys.stdin.read()\n"  # stays alive until told to exit
    )
    # a root (this shell) whose child writes: the tree's total includes the child
    proc = subprocess.Popen(
        ["/bin/sh", "-c", f"{sys.executable} -c \"$0\"", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    idle = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        meter = CpuMeter({"tree": proc.pid, "idle": idle.pid})
        meter.start()
        assert proc.stdout.readline().strip() == b"written"
        res = meter.stop()
    finally:
        proc.communicate(b"")
        idle.communicate(b"")
    assert res["written_bytes"]["tree"] >= 4_000_000
    assert res["written_bytes"]["idle"] < 100_000  # not charged to another tree


def test_a_gone_root_writes_nothing():
    assert tree_usage({"gone": 2**22 + 12345}) == ({"gone": 0.0}, {"gone": 0})


def run(name: str, written: dict[str, int], datapoints: int = 1000) -> dict:
    return {"name": name, "published_datapoints": datapoints, "cpu": {"written_bytes": written}}


def test_the_table_shows_bytes_per_datapoint_of_the_processes_that_wrote():
    rows = bench_e2e.disk_writes_table(
        [run("saturation", {"mosquitto": 5_000_000, "postgres": 300_000, "ingest": 0}),
         run("nodered-batched-saturation", {"mosquitto": 0, "postgres": 250_000})],
        ["ingest", "mosquitto", "postgres"], message_bytes=810, per_message=30,
    )  # fmt: skip
    text = "\n".join(rows)
    assert "| run | mosquitto | postgres | MB in all |" in text  # ingest wrote nothing: no column
    assert "| saturation | 5,000 | 300 | 5 |" in text
    assert "| nodered-batched-saturation | 0 | 250 | 0 |" in text
    assert "810 bytes, 27 per datapoint" in text


def test_runs_without_the_measure_or_without_writes_give_no_table():
    assert bench_e2e.disk_writes_table([{"name": "old", "published_datapoints": 5, "cpu": {}}], ["x"], 1, 1) == []
    assert bench_e2e.disk_writes_table([run("idle", {"x": 0})], ["x"], 1, 1) == []
