"""Does the impact verdict hold? Bias, RMSE, coverage of the 95% interval, false alarms on pilots
with no effect, and the interval's width, over many simulated pilots per scenario class —
the device-level estimator (``streams.impact``) beside the reading-level one it replaced
(``bench/impact/legacy.py``), on the same pilots in one run.

    python bench/bench_impact.py [--seeds 200] [--only NAME] [--out-dir bench/results]

Scenario classes: with a control group (several sizes, sampling intervals, effects), a null
pilot (true effect 0) with shared weather, tiny groups with a shared trend, no control group
with a seasonal trend, an interval-scale metric (°C around 0–1.5 °C), one device per group,
and a pilot drawn by pilotlab's own device models (``simulators.models``: per-device levels,
autocorrelated drift, shared weather). Results: a markdown table on stdout and in
``bench/results/impact-<UTC>.md`` with the JSON beside it.

What each column means:
- bias, RMSE: of the estimate against the true effect (relative, or in the unit);
- coverage: share of pilots whose 95% interval contains the true effect (should be ~95%);
- decisive: share of pilots with verdict "improved" or "worsened" (the legacy method had no
  verdict: its report said improved/worsened whenever the interval excluded 0); on a null
  pilot this is the false-alarm rate (should be ≤ 5%);
- half-width: median half-width of the interval; width ratio: that half-width divided by
  1.96 × the spread of the estimates across pilots (≈ 1 for an honest interval).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.impact.legacy import legacy_estimate  # noqa: E402
from pilotlab.manifest import Experiment  # noqa: E402
from pilotlab.metrics import METRICS  # noqa: E402
from simulators.models import simulate_experiment  # noqa: E402
from simulators.synthetic import PilotSpec, generate  # noqa: E402
from streams.impact import estimate_impact  # noqa: E402

Readings = list[tuple[str, int, float]]


@dataclass(frozen=True)
class Scenario:
    name: str
    truth: float
    scale: str  # "relative" | "absolute"
    make: Callable[[int], tuple[Experiment, Readings]] = field(repr=False)
    what: str = ""


def synthetic(name: str, spec: PilotSpec, what: str) -> Scenario:
    scale = "relative" if spec.ratio else "absolute"
    return Scenario(name, spec.effect, scale, lambda seed: generate(spec, seed), what)


def _air_quality_pilot(seed: int) -> tuple[Experiment, Readings]:
    """pilotlab's own device models: 5 + 5 air-quality sensors, 15-minute readings, 2 + 2
    weeks, NO2 −20% on the treatment sensors (models' defaults: per-device exposure,
    autocorrelated drift, shared weather)."""
    t0 = datetime(2026, 3, 2, tzinfo=UTC)
    mid, end = t0 + timedelta(days=14), t0 + timedelta(days=28)
    exp = Experiment.model_validate(
        {
            "id": "bench-aq",
            "title": "bench",
            "startup": "bench",
            "district": "bench",
            "location": {"lat": 45.06, "lon": 7.68},
            "periods": {
                "baseline": {"start": t0.isoformat(), "end": mid.isoformat()},
                "intervention": {"start": mid.isoformat(), "end": end.isoformat()},
            },
            "devices": [
                {"id": f"{g[0]}{i}", "kind": "air_quality", "group": g, "interval": "15m"}
                for g in ("treatment", "control")
                for i in range(5)
            ],
            "kpis": [{"name": "impact", "metric": "no2", "kind": "impact"}],
            "simulation": {"true_effects": {"no2": -0.2}},
        }
    )
    readings = [(s.device_id, s.ts_ms, s.metrics["no2"]) for s in simulate_experiment(exp, seed)]
    return exp, readings


SCENARIOS = [
    synthetic("control-8x8-5min", PilotSpec("control-8x8-5min", 8, 8, interval_s=300, effect=0.12, ar=0.85),
              "8 + 8 devices, 5-min readings, 2 + 2 weeks, +12%"),
    synthetic("null-5x5-weather", PilotSpec("null-5x5-weather", 5, 5, interval_s=900, ar=0.9, weather_sd=0.3),
              "5 + 5 devices, 15-min, strong shared weather, no effect"),
    synthetic("null-12x12-5min", PilotSpec("null-12x12-5min", 12, 12, interval_s=300, ar=0.9, level_sd=0.3),
              "12 + 12 devices, 5-min, no effect"),
    synthetic("tiny-3x3-trend", PilotSpec("tiny-3x3-trend", 3, 3, interval_s=3600, effect=-0.15, ar=0.8, trend=0.15),
              "3 + 3 devices, hourly, shared trend, −15%"),
    synthetic("unequal-3x9", PilotSpec("unequal-3x9", 3, 9, interval_s=900, effect=-0.1, ar=0.9),
              "3 treatment + 9 control devices, 15-min, −10%"),
    synthetic("no-control-trend", PilotSpec("no-control-trend", 8, 0, interval_s=900, effect=0.05, trend=-0.08),
              "8 devices, no control group, −8% seasonal trend, +5%"),
    synthetic("interval-temp", PilotSpec("interval-temp", 5, 5, interval_s=900, metric="temperature", level=0.8,
                                         effect=1.0, noise_sd=1.0, ar=0.9),
              "temperature around 0–1.5 °C, 5 + 5 devices, +1 °C"),
    synthetic("one-per-group", PilotSpec("one-per-group", 1, 1, interval_s=900),
              "1 + 1 devices, no effect"),
    Scenario("simulator-aq-5x5", -0.2, "relative", _air_quality_pilot,
             "pilotlab's device models: 5 + 5 air-quality sensors, 15-min, NO2 −20%"),
]  # fmt: skip


def run_seed(args: tuple[int, int]) -> dict:
    index, seed = args
    sc = SCENARIOS[index]
    exp, readings = sc.make(seed)
    new = estimate_impact(exp, exp.kpis[0].name, readings)
    legacy = legacy_estimate(exp, readings)
    old = legacy[sc.scale]
    return {
        "old_relative": legacy["relative"][0] if legacy["relative"] else None,
        "new": [new.estimate, new.ci_low, new.ci_high, new.verdict],
        "old": None if old is None else [old[0], old[1], old[2], None if old[1] <= 0 <= old[2] else "decisive"],
        "warnings": list(new.warnings),
    }


def summarise(sc: Scenario, runs: list[dict], method: str) -> dict:
    rows = [r[method] for r in runs if r[method] is not None and r[method][0] is not None]
    est = [r[0] for r in rows]
    with_ci = [r for r in rows if r[1] is not None]
    half = [(r[2] - r[1]) / 2 for r in with_ci]
    sd = statistics.stdev(est) if len(est) > 1 else math.nan
    covered = sum(r[1] <= sc.truth <= r[2] for r in with_ci)
    decisive = sum(r[3] in ("improved", "worsened", "decisive") for r in rows)
    return {
        "pilots": len(runs),
        "estimates": len(est),
        "bias": statistics.fmean(est) - sc.truth if est else None,
        "rmse": math.sqrt(statistics.fmean((e - sc.truth) ** 2 for e in est)) if est else None,
        "with_interval": len(with_ci),
        "covered": covered,
        "coverage": covered / len(with_ci) if with_ci else None,
        "decisive": decisive,
        "decisive_rate": decisive / len(runs),
        "median_half_width": statistics.median(half) if half else None,
        "width_ratio": statistics.median(half) / (1.96 * sd) if half and sd > 0 else None,
    }


def _range(xs: list[float | None]) -> list[float] | None:
    xs = [x for x in xs if x is not None]
    return [min(xs), max(xs)] if xs else None


def _fmt(x: float | None, pct: bool, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{100 * x:+.{digits}f}%" if pct else f"{x:+.{digits + 2}f}"


def table(results: list[dict]) -> str:
    head = ("| scenario | truth | method | bias | RMSE | coverage | decisive verdicts | half-width | width ratio |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |")  # fmt: skip
    lines = [head]
    for r in results:
        pct = r["scale"] == "relative"
        for method, label in (("old", "reading-level (old)"), ("new", "device-level (new)")):
            s = r[method]
            cov = "no interval"
            if s["coverage"] is not None:
                cov = f"{s['covered']}/{s['with_interval']} ({100 * s['coverage']:.1f}%)"
            dec = f"{s['decisive']}/{s['pilots']} ({100 * s['decisive_rate']:.1f}%)"
            hw = _fmt(s["median_half_width"], pct).lstrip("+")
            ratio = f"{s['width_ratio']:.2f}×" if s["width_ratio"] is not None else "–"
            truth = _fmt(r["truth"], pct, 0) + ("" if pct else f" {r['unit']}")
            lines.append(f"| {r['name']} | {truth} | {label} | {_fmt(s['bias'], pct, 2)} | "
                         f"{_fmt(s['rmse'], pct, 2).lstrip('+')} | {cov} | {dec} | {hw} | {ratio} |")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=200, help="pilots per scenario class (default 200)")
    ap.add_argument("--only", action="append", help="run only this scenario (repeatable)")
    ap.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args()
    chosen = [i for i, s in enumerate(SCENARIOS) if not args.only or s.name in args.only]
    started = time.monotonic()
    load = os.getloadavg()[0]
    results = []
    with ProcessPoolExecutor(args.workers) as pool:
        for i in chosen:
            sc = SCENARIOS[i]
            t = time.monotonic()
            runs = list(pool.map(run_seed, [(i, seed) for seed in range(args.seeds)], chunksize=4))
            exp = sc.make(0)[0]
            unit = METRICS[exp.kpis[0].metric].unit
            warnings: dict[str, int] = {}
            for r in runs:
                for w in r["warnings"]:
                    warnings[w] = warnings.get(w, 0) + 1
            results.append({
                "name": sc.name, "what": sc.what, "truth": sc.truth, "scale": sc.scale, "unit": unit,
                "new": summarise(sc, runs, "new"), "old": summarise(sc, runs, "old"),
                "new_verdicts": {v: sum(r["new"][3] == v for r in runs)
                                 for v in ("improved", "worsened", "no clear effect", "inconclusive")},
                "new_warnings": warnings, "seconds": round(time.monotonic() - t, 1),
                "old_relative_range": _range([r["old_relative"] for r in runs]) if sc.scale == "absolute" else None,
            })  # fmt: skip
            print(f"{sc.name}: {args.seeds} pilots in {time.monotonic() - t:.1f} s", file=sys.stderr)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    md = [
        f"# Impact benchmark {stamp}",
        "",
        f"`python bench/bench_impact.py --seeds {args.seeds}` — {args.seeds} simulated pilots per scenario, "
        f"load average {load:.2f} at start, {time.monotonic() - started:.0f} s. Truth and estimates are "
        "relative changes, except interval-scale metrics (in their unit).",
        "",
        table(results),
        "",
        "Verdicts of the device-level method and its warnings (how many pilots):",
        "",
        *(f"- {r['name']} ({r['what']}): {r['new_verdicts']}; warnings {r['new_warnings']}" for r in results),
        "",
        *(
            f"On {r['name']} the old method reported a relative change from {100 * r['old_relative_range'][0]:+.0f}%"
            f" to {100 * r['old_relative_range'][1]:+.0f}% for the same {r['truth']:+g} {r['unit']} effect."
            for r in results
            if r["old_relative_range"]
        ),
        "",
    ]
    text = "\n".join(md)
    print(text)
    if not args.no_write:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / f"impact-{stamp}.md").write_text(text)
        doc = {"stamp": stamp, "seeds": args.seeds, "load_at_start": load, "scenarios": results}
        (args.out_dir / f"impact-{stamp}.json").write_text(json.dumps(doc, indent=1))
        print(f"wrote {args.out_dir}/impact-{stamp}.md and .json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
