"""The end-to-end benchmark's results are written once: each run's JSON and markdown under its
start time, and ``latest*.md`` only points at the newest run of every phase (bench/bench_e2e.py,
``save``). The integration test test_bench_e2e.py checks the same on a real quick run."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import bench_e2e

REPO = Path(__file__).resolve().parents[2]


def result(started: str, phases=bench_e2e.PHASES, quick=False, storage="both") -> dict:
    return {
        "started_at": started,
        "config": {"quick": quick, "kafka_storage": storage},
        "phases": list(phases),
    }


@pytest.fixture(autouse=True)
def _plain_markdown(monkeypatch):
    # the report's rendering is not what this tests: only where the files go
    monkeypatch.setattr(bench_e2e, "markdown", lambda res: f"# pilotlab end-to-end benchmark {res['started_at']}\n")


def names(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir())


@pytest.mark.parametrize(
    ("quick", "storage", "prefix", "pointer"),
    [
        (False, "both", "e2e", "latest.md"),
        (True, "both", "e2e-quick", "latest-quick.md"),
        (False, "memory", "e2e-memory", "latest-memory.md"),
        (True, "memory", "e2e-quick-memory", "latest-quick-memory.md"),
        (False, "durable", "e2e-durable", "latest-durable.md"),
    ],
)
def test_a_run_is_written_once_and_the_pointer_names_it(tmp_path, quick, storage, prefix, pointer):
    j, md = bench_e2e.save(result("2026-12-02T14:00:00Z", quick=quick, storage=storage), tmp_path)
    assert (j.name, md.name) == (f"{prefix}-20261202T140000Z.json", f"{prefix}-20261202T140000Z.md")
    assert names(tmp_path) == sorted([j.name, md.name, pointer])  # no copy of the figures
    text = (tmp_path / pointer).read_text()
    assert f"]({j.name})" in text and f"]({md.name})" in text
    assert "benchmark 2026" not in text  # it points, it does not repeat the report


def test_the_pointer_moves_to_the_newest_run_of_every_phase_only(tmp_path):
    first, _ = bench_e2e.save(result("2026-12-02T14:00:00Z"), tmp_path)
    partial, _ = bench_e2e.save(result("2026-12-02T15:00:00Z", phases=["fixed", "saturation"]), tmp_path)
    assert partial.exists()
    assert f"]({first.name})" in (tmp_path / "latest.md").read_text()
    newest, _ = bench_e2e.save(result("2026-12-02T16:00:00Z"), tmp_path)
    assert f"]({newest.name})" in (tmp_path / "latest.md").read_text()


def test_the_committed_pointer_names_committed_runs():
    results = REPO / "bench" / "results"
    assert not list(results.glob("latest*.json")), "a run's figures are committed once, under its start time"
    for pointer in results.glob("latest*.md"):
        text = pointer.read_text()
        linked = [name for name in (p.name for p in results.glob("e2e*")) if f"]({name})" in text]
        assert len(linked) == 2, f"{pointer.name} should link one run's .json and .md: {linked}"
