"""The HTML impact report's impact section, rendered from stored impact details without a
database: the stored verdict (not one recomputed from the CI), each estimate in its scale,
devices per group, design and method, warnings as sentences, the placebo check, and one
forest plot per scale."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from dashboards import impact_text as it
from dashboards.report import Impact, PeriodRow, ReportData, forest_plot, forest_plots, render
from pilotlab.contracts import IMPACT_WARNINGS as WARNINGS

T0 = datetime(2026, 3, 2, tzinfo=UTC)


def details(**kw) -> dict:
    d = {
        "estimate": -0.291, "ci_low": -0.33, "ci_high": -0.25, "scale": "relative", "unit": None,
        "verdict": "improved", "warnings": [], "devices": {"treatment": 6, "control": 6},
        "method": "device-level difference-in-differences: per device the change of its period mean (log ratio), "
                  "treatment minus control, t-interval across devices",
        "design": "difference-in-differences", "final": True, "level": 0.95, "se": 0.02, "df": 10,
        "p_value": 1e-6, "placebo": {"estimate": 0.004, "ci_low": -0.01, "ci_high": 0.02},
        "readings": {"treatment": {"baseline": 100, "intervention": 100},
                     "control": {"baseline": 100, "intervention": 100}},
        "mean": {"treatment": {"baseline": 1.0, "intervention": 0.7},
                 "control": {"baseline": 1.0, "intervention": 1.0}},
    }  # fmt: skip
    d.update(kw)
    return d


def noise_details(**kw) -> dict:
    return details(estimate=-2.1, ci_low=-3.4, ci_high=-0.8, scale="absolute", unit="dB(A)",
                   method="device-level difference-in-differences: per device the change of its period mean "
                          "(difference, in dB(A)), treatment minus control, t-interval across devices",
                   placebo={"estimate": 0.2, "ci_low": -0.5, "ci_high": 0.9}, **kw)


def report(impacts: list[Impact]) -> ReportData:
    return ReportData("pilot", "A pilot", "Startup", "District", (T0, T0 + timedelta(days=14)),
                      (T0 + timedelta(days=14), T0 + timedelta(days=28)), T0 + timedelta(days=29), impacts=impacts)


def example() -> ReportData:
    """Every verdict, both scales, a placebo failure, an interim and a no-control impact."""
    return report([
        Impact("energy_impact", "energy", details(), "lower", -0.30),
        Impact("noise_impact", "noise", noise_details(), "lower", -2.0),
        Impact("temp_impact", "temperature", details(
            estimate=1.02, ci_low=0.4, ci_high=1.64, scale="absolute", unit="degC", verdict="worsened",
            warnings=["few_devices"], devices={"treatment": 2, "control": 3})),
        Impact("pm25_impact", "pm25", details(estimate=-0.02, ci_low=-0.06, ci_high=0.02, verdict="no clear effect")),
        Impact("no2_impact", "no2", details(verdict="inconclusive", final=False, warnings=["interim", "placebo_shift"],
                                            placebo={"estimate": 0.08, "ci_low": 0.03, "ci_high": 0.13})),
        Impact("occupancy_impact", "occupancy", details(
            estimate=0.12, ci_low=0.11, ci_high=0.13, verdict="inconclusive", warnings=["no_control_group"],
            devices={"treatment": 8, "control": 0}, design="before-after",
            readings={"treatment": {"baseline": 50, "intervention": 50}}), "higher", 0.12),
        Impact("trips_impact", "trips", details(
            estimate=None, ci_low=None, ci_high=None, verdict="inconclusive", warnings=["no_data"], placebo=None,
            devices={"treatment": 0, "control": 0}, readings={})),
        # a ratio-scale metric whose impact fell back to a difference: its relative truth stays off the axis
        Impact("fill_impact", "fill_level", details(
            estimate=-0.05, ci_low=-0.08, ci_high=-0.02, scale="absolute", unit="ratio",
            warnings=["relative_undefined"]), "lower", -0.2),
    ])  # fmt: skip


def _card(html: str, kpi: str) -> str:
    cards = re.findall(r'<div class="card impact".*?<div class="method">.*?</div></div>', html, re.S)
    return next(c for c in cards if f">{kpi} · " in c)


def test_formatting_by_scale():
    assert it.effect(-0.291, "relative", None) == "-29.1%"
    assert it.effect(0.0004, "relative", None) == "0.0%"
    assert it.effect(1.02, "absolute", "degC") == "+1.02 degC"
    assert it.effect(-2.1, "absolute", "dB(A)", 1) == "-2.1 dB(A)"
    assert it.interval(-0.33, -0.25, "relative", None) == "-33.0% … -25.0%"
    assert it.interval(-3.4, -0.8, "absolute", "dB(A)", -2.1) == "-3.40 … -0.80 dB(A)"
    assert it.estimate_with_interval(details()) == "-29.1% [95% CI -33.0% … -25.0%]"
    assert it.estimate_with_interval(noise_details()) == "-2.10 dB(A) [95% CI -3.40 … -0.80 dB(A)]"
    assert it.estimate_with_interval(details(ci_low=None, ci_high=None)) == "-29.1%"
    assert it.devices({"treatment": 6, "control": 6}, "difference-in-differences") == "6 vs 6 devices"
    assert it.devices({"treatment": 8, "control": 0}, "before-after") == "8 devices, no control group"
    assert it.sentences(["no_control_group", "new_code"]) == [WARNINGS["no_control_group"], "new_code"]
    assert it.verdict_of({"verdict": "worsened"}) == "worsened" and it.verdict_of({}) == "inconclusive"


def test_cards_show_the_stored_verdict_scale_devices_design_warnings_and_placebo():
    html = render(example())
    energy = _card(html, "energy_impact")
    assert "✓ improved" in energy and it.VERDICT_COLOURS["improved"] in energy
    assert "-29.1%" in energy and "95% CI -33.0% … -25.0%" in energy
    assert "<b>6</b> treatment" in energy and "<b>6</b> control" in energy
    assert "Design: difference-in-differences · final" in energy
    assert "device-level difference-in-differences" in energy
    assert "passed" in energy and "No warnings." in energy
    assert "Simulated true effect -30.0%" in energy

    noise = _card(html, "noise_impact")  # absolute: in dB(A), never × 100 as %
    assert "-2.10 dB(A)" in noise and "95% CI -3.40 … -0.80 dB(A)" in noise and "difference in dB(A)" in noise
    assert "-210" not in noise and not re.search(r"[+-]\d[\d.]*%", noise.split("Simulated")[0])
    assert "Placebo check (baseline, 2nd half vs 1st half): +0.20 dB(A) [95% CI -0.50 … +0.90 dB(A)]" in noise
    assert "Simulated true effect -2.00 dB(A)</div>" in noise  # an interval-scale truth: in the unit
    assert "+1.02 degC" in _card(html, "temp_impact")
    assert "✗ worsened" in _card(html, "temp_impact") and WARNINGS["few_devices"] in _card(html, "temp_impact")

    # the stored verdict wins: this CI excludes zero, but the engine withheld the verdict
    no2 = _card(html, "no2_impact")
    assert "? inconclusive" in no2 and "improved" not in no2
    assert WARNINGS["interim"] in no2 and "interim: the intervention has not ended" in no2
    assert "failed" in no2 and WARNINGS["placebo_shift"].replace("'", "&#x27;") in no2
    assert "= no clear effect" in _card(html, "pm25_impact")

    parking = _card(html, "occupancy_impact")
    assert "? inconclusive" in parking and WARNINGS["no_control_group"] in parking
    assert "<b>8</b> treatment" in parking and "no control group" in parking and "before-after" in parking

    fill = _card(html, "fill_impact")
    assert "-0.0500 ratio" in fill and "Simulated true effect -20.0% (on another scale than this estimate)" in fill
    trips = _card(html, "trips_impact")
    assert "no estimate yet" in trips and WARNINGS["no_data"] in trips and "not available" in trips


def test_forest_plots_never_mix_scales():
    data = example()
    html = forest_plots(data.impacts)
    plots = re.findall(r'<h3 class="plot">(.*?)</h3>(<svg.*?</svg>)', html, re.S)
    assert [p[0].split(" (")[0].split(",")[0] for p in plots] == ["Relative change", "Difference in dB(A)",
                                                                   "Difference in degC", "Difference in ratio"]
    relative, noise, temp, fill = (p[1] for p in plots)
    assert "fill_impact" in fill and "<title>simulated true effect" not in fill
    assert "energy_impact" in relative and "noise_impact" not in relative and "%</text>" in relative
    assert "noise_impact" in noise and "energy_impact" not in noise and not re.search(r"[+-]\d[\d.]*%", noise)
    assert ">-2.10 dB(A)</text>" in noise and "temp_impact" in temp
    assert "<title>simulated true effect -2.00 dB(A)</title>" in noise  # the truth on its own axis
    assert "<title>simulated true effect -30.0%</title>" in relative
    assert "trips_impact" not in html  # no estimate, nothing to draw
    # hollow dot for an inconclusive verdict, filled for the others
    assert 'fill="#fff" stroke="' + it.VERDICT_COLOURS["inconclusive"] in relative
    with pytest.raises(ValueError):
        forest_plot(data.impacts)


def test_absolute_period_change_is_a_difference():
    assert PeriodRow("noise_mean", "noise", "mean", "treatment", 60.0, 58.5).change_text() == "-1.50 dB(A)"
    assert PeriodRow("no2_mean", "no2", "mean", "treatment", 40.0, 30.0).change_text() == "-25.0%"
    assert PeriodRow("noise_over", "noise", "exceedance", "treatment", 0.5, 0.25).change_text() == "-50.0%"


def test_a_pilot_without_impacts_renders():
    html = render(report([]))
    assert "declares no impact KPI" in html and "No impact estimate yet." in html


# --- the alerts section --------------------------------------------------------------------------

from storage.queries import AlertTransition, OpenAlert  # noqa: E402


def _open(rule: str, severity: str, subject: str, minutes: int, summary: str) -> OpenAlert:
    return OpenAlert(f"id-{rule}-{subject}", "pilot", rule, "device_offline", severity, subject, subject,
                     T0 + timedelta(minutes=minutes), 0.8, 0.5, summary, 3, 2, 1, 0)  # fmt: skip


def _moved(event: str, rule: str, subject: str, minutes: int, severity: str = "warning") -> AlertTransition:
    return AlertTransition(T0 + timedelta(minutes=minutes), event, f"id-{rule}-{subject}", "pilot", rule,
                           "device_offline", severity, subject, subject, 1.0, None, f"{rule} {event} <{subject}>",
                           T0)  # fmt: skip


def _alerts_html(html: str) -> str:
    return html.split("<h2>Alerts</h2>")[1].split("<h2>Rejections</h2>", maxsplit=1)[0]


def test_alerts_section_lists_open_alerts_and_history():
    data = report([])
    data.open_alerts = [_open("offline", "critical", "dev-1", 5, "dev-1 silent for 6 intervals <of 60 s>"),
                        _open("low_completeness", "warning", "dev-2", 7, "completeness 50% < 80%")]  # fmt: skip
    data.alert_history = [_moved("resolved", "offline", "dev-3", 9), _moved("firing", "offline", "dev-3", 4),
                          _moved("firing", "offline", "dev-1", 5, "critical")]  # fmt: skip
    section = _alerts_html(render(data))
    assert "<b>2</b> alerts firing (1 critical, 1 warning)" in section
    rows = re.findall(r"<tr><td>(.*?)</tr>", section.split("<h3>Recent history</h3>")[0], re.S)
    assert [re.search(r">(critical|warning)<", r).group(1) for r in rows] == ["critical", "warning"]
    assert "2026-03-02 00:05:00" in rows[0] and ">0.5<" in rows[0] and ">0.8<" in rows[0]
    assert "dev-1 silent for 6 intervals &lt;of 60 s&gt;" in rows[0]  # escaped
    assert 'color:#b91c1c;font-weight:700">critical' in rows[0]
    history = section.split("<h3>Recent history</h3>")[1]
    events = re.findall(r'font-weight:700">(firing|resolved)</span>', history)
    assert events == ["resolved", "firing", "firing"]
    assert "offline resolved &lt;dev-3&gt;" in history and "(every transition)" in history
    assert "2026-03-02 00:09:00" in history


def test_alerts_section_without_alerts():
    section = _alerts_html(render(report([])))
    assert "<b>0</b> alerts firing." in section
    assert "No alert is firing." in section and "No alert has fired." in section and "<table>" not in section
