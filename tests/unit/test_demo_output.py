"""``pilotlab demo``'s impact output from stored impact details, without a stack: the JSON
fields of each impact KPI and the terminal line with its warnings as sentences."""

from __future__ import annotations

from control import demo
from control.demo import ImpactRow, impact_line, summarise
from pilotlab.contracts import IMPACT_WARNINGS as WARNINGS
from pilotlab.manifest import load_manifests


def _experiment(exp_id: str):
    return next(e for e in load_manifests(demo.EXAMPLES) if e.id == exp_id)


def _details(**kw) -> dict:
    d = {
        "estimate": -0.291, "ci_low": -0.33, "ci_high": -0.25, "scale": "relative", "unit": None,
        "verdict": "improved", "warnings": [], "devices": {"treatment": 6, "control": 6},
        "method": "device-level difference-in-differences: per device the change of its period mean (log ratio), "
                  "treatment minus control, t-interval across devices",
        "design": "difference-in-differences", "final": True, "level": 0.95, "se": 0.02, "df": 10, "p_value": 1e-6,
        "placebo": {"estimate": 0.004, "ci_low": -0.01, "ci_high": 0.02}, "readings": {}, "mean": {},
    }  # fmt: skip
    d.update(kw)
    return d


def test_json_carries_verdict_warnings_devices_method_and_scale():
    exp = _experiment("adaptive-lighting-borgo-po")
    rows = {"energy_impact": ImpactRow("energy_impact", "energy", -0.291, 100, 3, _details())}
    out = summarise(exp, [], rows, {}, 0)
    (k,) = [k for k in out["kpis"] if k["kind"] == "impact"]
    imp = k["impact"]
    assert (imp["estimate"], imp["ci_low"], imp["ci_high"], imp["true_effect"]) == (-0.291, -0.33, -0.25, -0.30)
    assert imp["verdict"] == "improved" and imp["warnings"] == [] and imp["warning_sentences"] == []
    assert imp["devices"] == {"treatment": 6, "control": 6} and imp["scale"] == "relative" and imp["unit"] is None
    assert imp["method"].startswith("device-level difference-in-differences") and imp["revision"] == 3
    assert "absolute" not in imp and "n" not in imp
    line, warnings = impact_line(k)
    assert line == ("impact energy_impact (energy): -29.1% [95% CI -33.0% … -25.0%] improved · 6 vs 6 devices "
                    "(true effect -30.0%)")
    assert warnings == []


def test_no_control_group_line_and_warnings():
    exp = _experiment("smart-parking-crocetta")
    d = _details(estimate=0.121, ci_low=0.114, ci_high=0.128, verdict="inconclusive", warnings=["no_control_group"],
                 devices={"treatment": 8, "control": 0}, design="before-after")
    out = summarise(exp, [], {"occupancy_impact": ImpactRow("occupancy_impact", "occupancy", 0.121, 1, 1, d)}, {}, 0)
    (k,) = [k for k in out["kpis"] if k["kind"] == "impact"]
    line, warnings = impact_line(k)
    assert line == ("impact occupancy_impact (occupancy): +12.1% [95% CI +11.4% … +12.8%] inconclusive · "
                    "8 devices, no control group (true effect +12.0%)")
    assert warnings == [WARNINGS["no_control_group"]] == k["impact"]["warning_sentences"]


def test_absolute_impact_in_its_unit_and_missing_impact():
    k = {"kpi": "noise_impact", "metric": "noise", "impact": {
        **_details(estimate=-2.1, ci_low=-3.4, ci_high=-0.8, scale="absolute", unit="dB(A)", warnings=["few_devices"],
                   devices={"treatment": 2, "control": 4}),
        "true_effect": -2.0, "warning_sentences": [WARNINGS["few_devices"]]}}  # fmt: skip
    line, warnings = impact_line(k)
    assert line == ("impact noise_impact (noise): -2.10 dB(A) [95% CI -3.40 … -0.80 dB(A)] improved · 2 vs 4 devices "
                    "(true effect -2.00 dB(A))")
    assert warnings == [WARNINGS["few_devices"]]
    # a ratio-scale metric whose impact fell back to a difference: its true effect is relative
    k = {"kpi": "trips_impact", "metric": "trips", "impact": {
        **_details(estimate=-3.0, ci_low=-4.0, ci_high=-2.0, scale="absolute", unit="count"),
        "true_effect": -0.2, "warning_sentences": []}}  # fmt: skip
    assert impact_line(k)[0].endswith("(true effect -20.0%, on another scale)")
    # an impact KPI the engine has not stored yet: inconclusive, no data
    out = summarise(_experiment("lez-san-salvario"), [], {}, {}, 0)
    imp = next(k["impact"] for k in out["kpis"] if k["kind"] == "impact")
    assert imp["verdict"] == "inconclusive" and imp["warnings"] == ["no_data"] and imp["estimate"] is None
    assert impact_line(next(k for k in out["kpis"] if k["kind"] == "impact"))[0].startswith(
        "impact no2_impact (no2): — inconclusive · 0 vs 0 devices")


def test_terminal_render_prints_verdict_and_warning_sentences(capsys):
    exp = _experiment("smart-parking-crocetta")
    d = _details(verdict="inconclusive", warnings=["no_control_group"], devices={"treatment": 8, "control": 0},
                 design="before-after")
    rows = {"occupancy_impact": ImpactRow("occupancy_impact", "occupancy", 0.1, 1, 1, d)}
    result = {
        "experiments": [summarise(exp, [], rows, {"wrong_type": 2}, 10)],
        "reports": [], "messages_published": 1, "datapoints_accepted_expected": 1, "simulated_span_days": 28,
        "timings": {"stack_up_s": 1, "publish_s": 1, "drain_s": 1, "total_s": 3},
    }  # fmt: skip
    demo.render(result)
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "inconclusive · 8 devices, no control group" in out
    assert f"! {WARNINGS['no_control_group']}" in out and "method: device-level" in out
