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


def _episode(rule: str, status: str, minute: int, severity: str = "warning", subject: str = "aq-01"):
    from datetime import UTC, datetime  # noqa: PLC0415

    from storage.queries import AlertEpisode  # noqa: PLC0415

    at = datetime(2026, 11, 20, 8, minute, tzinfo=UTC)
    return AlertEpisode(
        alert_id=f"{rule}-{minute}", experiment_id="lez-san-salvario", rule=rule, kind="device_offline",
        severity=severity, subject=subject, device_id=subject, status=status, fired_at=at,
        resolved_at=None if status == "firing" else at, threshold=None, value=None,
        summary=f"{subject}: {rule} at 08:{minute:02d}", resolved_summary=None,
        deliveries=0, delivered=0, failed=0, pending=0,
    )  # fmt: skip


def test_alerts_are_counted_per_rule_with_what_still_fires_and_the_newest_three():
    episodes = [  # newest first, as alert_history returns them
        _episode("device-offline", "firing", 40),
        _episode("firmware-broken", "resolved", 30, severity="critical", subject="aq-02"),
        _episode("device-offline", "resolved", 20),
        _episode("device-offline", "resolved", 10),
    ]
    out = summarise(_experiment("lez-san-salvario"), [], {}, {}, 0, alerts=episodes)["alerts"]
    assert (out["fired"], out["firing"]) == (4, 1)
    assert out["by_rule"] == {
        "device-offline": {"severity": "warning", "fired": 3, "firing": 1},
        "firmware-broken": {"severity": "critical", "fired": 1, "firing": 0},
    }
    assert [a["fired_at"][11:16] for a in out["newest"]] == ["08:40", "08:30", "08:20"]
    assert summarise(_experiment("lez-san-salvario"), [], {}, {}, 0)["alerts"] == {
        "rules": ["device-offline", "sensor-incomplete", "no2-hourly-limit", "firmware-broken"],
        "fired": 0, "firing": 0, "by_rule": {}, "newest": [],
    }


def test_terminal_render_lists_the_alerts(capsys):
    exp = summarise(_experiment("lez-san-salvario"), [], {}, {}, 0,
                    alerts=[_episode("device-offline", "firing", 40), _episode("device-offline", "resolved", 5)])
    result = {
        "experiments": [exp], "reports": [], "messages_published": 1, "datapoints_accepted_expected": 1,
        "simulated_span_days": 28, "timings": {"stack_up_s": 1, "publish_s": 1, "drain_s": 1, "total_s": 3},
    }  # fmt: skip
    demo.render(result)
    out = " ".join(capsys.readouterr().out.split())
    assert "alerts: device-offline (warning) ×2, 1 still firing" in out
    assert "2026-11-20T08:40 aq-01: device-offline at 08:40" in out
    exp["alerts"] = summarise(_experiment("lez-san-salvario"), [], {}, {}, 0)["alerts"]
    demo.render(result)
    out = " ".join(capsys.readouterr().out.split())
    judged = "device-offline, sensor-incomplete, no2-hourly-limit, firmware-broken"
    assert f"alerts: none fired (rules judged: {judged})" in out
