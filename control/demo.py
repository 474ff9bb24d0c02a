"""``pilotlab demo``: three simulated pilots through the whole real pipeline, in accelerated time.

Steps: stack up → schema and topics → manifests applied (periods moved so the intervention
ends now) → ingest, streams, sink and alerts started → four weeks of sensor traffic published
over MQTT in about ``duration_s`` seconds → wait until everything is stored and judged by the
alert rules → KPIs per period and the alerts read back from the database → everything this
command started is stopped.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from importlib import resources
from pathlib import Path

import psycopg
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from control.portal import portal_beside
from control.services import SERVICE_NAMES, Services
from control.stack import Stack
from dashboards import impact_text as it
from dashboards.report import load as load_report
from dashboards.report import render as render_report
from pilotlab import registry
from pilotlab.contracts import utcnow
from pilotlab.kafka_admin import ensure_topics, lag_or_reason
from pilotlab.manifest import Experiment, load_manifests
from pilotlab.metrics import METRICS
from pilotlab.settings import AlertsSettings
from simulators.publisher import publish
from storage.migrate import migrate
from storage.queries import (
    AlertEpisode,
    PeriodValue,
    alert_history,
    kpi_period_summary,
    rejections_by_reason,
    streams_impact,
    table_counts,
)
from streams.alerting import TOPICS as ALERT_TOPICS

log = logging.getLogger("pilotlab.demo")

# the demo's manifests: package data of control (pyproject), found where the package is installed
# (pip installs packages unzipped: the resource is a directory on disk)
EXAMPLES = Path(str(resources.files("control") / "examples" / "experiments"))


def anchored(experiments: list[Experiment]) -> list[Experiment]:
    """Move each experiment so that its intervention ends at the last full hour."""
    now = utcnow().replace(minute=0, second=0, microsecond=0)
    return [e.shifted(now - e.periods.intervention.end) for e in experiments]


def _rel(after: float | None, before: float | None) -> float | None:
    if after is None or before is None or before == 0:
        return None
    return after / before - 1


def _change(metric: str, after: float | None, before: float | None) -> str:
    """A period mean's change: relative (``-25.0%``), or a difference in the unit for a metric
    without a true zero (``-1.50 dB(A)``)."""
    m = METRICS.get(metric)
    if m is not None and m.scale == "interval":
        diff = None if after is None or before is None else after - before
        return it.effect(diff, "absolute", m.unit)
    return _fmt(_rel(after, before), pct=True)


def impact_line(k: dict) -> tuple[str, list[str]]:
    """One impact KPI as the terminal shows it, plain text: ``impact energy_impact (energy):
    -29.1% [95% CI -33.0% … -25.0%] improved · 6 vs 6 devices (true effect -30.0%)``, and
    the sentences of its warnings."""
    imp = k["impact"]
    truth = ""
    if imp["true_effect"] is not None:  # stated on the metric's scale (relative, or in its unit)
        scale, unit = it.metric_scale(k["metric"])
        other = "" if (scale, unit) == (imp["scale"], imp["unit"]) else ", on another scale"
        truth = f" (true effect {it.effect(imp['true_effect'], scale, unit)}{other})"
    line = (
        f"impact {k['kpi']} ({k['metric']}): {it.estimate_with_interval(imp)} {imp['verdict']}"
        f" · {it.devices(imp['devices'], imp['design'])}{truth}"
    )
    return line, list(imp["warning_sentences"])


@dataclass(frozen=True)
class ImpactRow:
    """An impact KPI as the streams engine last revised it (``kpi_values``, kind impact)."""

    kpi: str
    metric: str
    value: float | None
    sample_count: int
    revision: int
    details: dict


def period_overview(conn: psycopg.Connection, experiment_id: str) -> list[PeriodValue]:
    return kpi_period_summary(conn, experiment_id)


def impacts(conn: psycopg.Connection, experiment_id: str) -> dict[str, ImpactRow]:
    return {
        r.kpi: ImpactRow(r.kpi, r.metric, r.value, r.sample_count, r.revision, r.details or {})
        for r in streams_impact(conn, experiment_id)
    }


def alert_summary(experiment: Experiment, episodes: list[AlertEpisode]) -> dict:
    """An experiment's alerts for the demo's output: the rules judged (the manifest's enabled
    ones), how many alerts fired and how many still fire, per rule (with its severity), and
    the newest few in the service's own words."""
    by_rule: dict[str, dict] = {}
    for a in episodes:
        r = by_rule.setdefault(a.rule, {"severity": a.severity, "fired": 0, "firing": 0})
        r["fired"] += 1
        r["firing"] += a.status == "firing"
    return {
        "rules": [r.name for r in experiment.alerts if r.enabled],
        "fired": len(episodes),
        "firing": sum(a.status == "firing" for a in episodes),
        "by_rule": dict(sorted(by_rule.items())),
        "newest": [
            {
                "rule": a.rule,
                "severity": a.severity,
                "subject": a.subject,
                "status": a.status,
                "fired_at": a.fired_at.isoformat(),
                "summary": a.summary,
            }
            for a in episodes[:3]
        ],
    }


def summarise(
    experiment: Experiment,
    values: list[PeriodValue],
    impact_rows: dict[str, ImpactRow],
    rejections: dict[str, int],
    stored_readings: int,
    *,
    alerts: list[AlertEpisode] | None = None,
) -> dict:
    """Per KPI: baseline and intervention values per group; for impact KPIs, what the streams
    engine computed (read back from ``kpi_values``): the estimate and 95% CI in their scale
    (``scale`` relative: a fraction, −0.25 = −25%; absolute: a difference in ``unit``), the
    verdict, the warning codes and their sentences, the devices analysed per group, the design
    and method — next to the simulation's true effect (on the metric's scale: relative for a
    ratio-scale metric, in its unit for an interval-scale one)."""
    by_kpi: dict[str, dict] = {}
    for v in values:
        k = by_kpi.setdefault(v.kpi, {"kpi": v.kpi, "metric": v.metric, "kind": v.kind, "groups": {}})
        k["groups"].setdefault(v.device_group, {})[v.period] = v.value
    true_effects = experiment.simulation.true_effects if experiment.simulation else {}
    kpis = []
    for kpi in experiment.kpis:
        k = by_kpi.get(kpi.name, {"kpi": kpi.name, "metric": kpi.metric, "kind": kpi.kind, "groups": {}})
        k["window_s"] = kpi.window
        if kpi.kind == "impact":
            row = impact_rows.get(kpi.name)
            d = row.details if row else {}
            warnings = list(d.get("warnings") or ([] if row else ["no_data"]))
            k["impact"] = {
                "estimate": d.get("estimate"),
                "ci_low": d.get("ci_low"),
                "ci_high": d.get("ci_high"),
                "scale": d.get("scale", "relative"),
                "unit": d.get("unit"),
                "verdict": it.verdict_of(d),
                "warnings": warnings,
                "warning_sentences": it.sentences(warnings),
                "devices": d.get("devices") or {"treatment": 0, "control": 0},
                "design": d.get("design") or (
                    "difference-in-differences"
                    if any(dev.group == "control" for dev in experiment.devices)
                    else "before-after"
                ),
                "method": d.get("method", "no data yet"),
                "final": d.get("final"),
                "p_value": d.get("p_value"),
                "placebo": d.get("placebo"),
                "true_effect": true_effects.get(kpi.metric),
                "readings": d.get("readings"),
                "mean": d.get("mean"),
                "revision": row.revision if row else None,
            }
        kpis.append(k)
    return {
        "id": experiment.id,
        "title": experiment.title,
        "startup": experiment.startup,
        "district": experiment.district,
        "baseline": [
            experiment.periods.baseline.start.isoformat(),
            experiment.periods.baseline.end.isoformat(),
        ],
        "intervention": [
            experiment.periods.intervention.start.isoformat(),
            experiment.periods.intervention.end.isoformat(),
        ],
        "devices": len(experiment.devices),
        "readings_stored": stored_readings,
        "rejections": rejections,
        "alerts": alert_summary(experiment, alerts or []),
        "kpis": kpis,
    }


def run_demo(  # noqa: PLR0917
    data_dir: Path, duration_s: float, seed: int, manifests: Path = EXAMPLES, serve: bool = True,
    on_portal: Callable[[dict], None] | None = None, hold: Callable[[dict], None] | None = None,
) -> dict:
    """``serve``: the web portal runs beside the pipeline from the schema's creation to the end
    (``on_portal`` gets its URL and tokens as soon as it answers); ``hold`` gets the result
    while the portal and the stack still run (``--keep-serving``: until Ctrl-C)."""
    t0 = time.monotonic()
    stack = Stack(data_dir)
    was_up = stack.status()["up"]
    state = stack.up()
    timings: dict[str, float] = {"stack_up_s": time.monotonic() - t0}
    keep = contextlib.ExitStack()
    try:
        experiments = anchored(load_manifests(manifests))
        span = max(e.periods.intervention.end - e.periods.baseline.start for e in experiments)
        migrate(state.database_url)
        ensure_topics(state.kafka_bootstrap, partitions=4)
        registry.publish(state.kafka_bootstrap, experiments)
        portal = None
        if serve:  # a lab token, and one startup's: it sees its pilot only
            run = keep.enter_context(portal_beside(state, stack.data_dir, stack.logs, experiments[0].startup))
            portal = run.as_dict()
            if on_portal is not None:
                on_portal(portal)
        env = {"PILOTLAB_INGEST_MAX_AGE_S": str(int((span + timedelta(days=2)).total_seconds()))}
        with Services(state, stack.logs / "services", env).start(*SERVICE_NAMES, "alerts") as services:
            t1 = time.monotonic()
            services.wait_ingest_ready()
            log.info(
                "services ready in %.1f s; publishing %s of simulated traffic", time.monotonic() - t1, span
            )
            t2 = time.monotonic()
            truth = publish(state.mqtt_url, experiments, seed=seed, duration_s=duration_s, batch=4)
            timings["publish_s"] = time.monotonic() - t2
            log.info("published %d messages; waiting for the pipeline to drain", truth.messages)
            timings["drain_s"] = services.wait_drained(len(truth.accepted), sum(truth.rejected.values()))
            timings["alerts_s"] = wait_alerts_judged(state.kafka_bootstrap, services)
        with psycopg.connect(state.database_url) as conn:
            results = []
            for exp in experiments:
                stored = conn.execute(
                    "SELECT count(*) FROM readings WHERE experiment_id = %s", (exp.id,)
                ).fetchone()[0]
                results.append(
                    summarise(
                        exp,
                        period_overview(conn, exp.id),
                        impacts(conn, exp.id),
                        rejections_by_reason(conn, exp.id),
                        stored,
                        alerts=alert_history(conn, exp.id),
                    )
                )
            counts = table_counts(conn)
            reports = []
            for exp in experiments:  # one self-contained HTML impact report per experiment
                path = stack.data_dir / "reports" / f"{exp.id}.html"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(render_report(load_report(conn, exp.id)), encoding="utf-8")
                reports.append(str(path))
        timings["total_s"] = time.monotonic() - t0
        result = {
            "seed": seed,
            "simulated_span_days": span.total_seconds() / 86400,
            "messages_published": truth.messages,
            "datapoints_accepted_expected": len(truth.accepted),
            "rejections_expected": {str(k): v for k, v in sorted(truth.rejected.items())},
            "tables": counts,
            "timings": {k: round(v, 2) for k, v in timings.items()},
            "experiments": results,
            "reports": reports,
            "portal": portal,
        }
        if hold is not None:
            hold(result)
        return result
    finally:
        keep.close()
        if not was_up:
            stack.down()


def wait_alerts_judged(bootstrap: str, services: Services, timeout: float = 120.0) -> float:
    """Until the alerts service has read everything stored (its consumer group's lag is 0);
    returns the seconds waited. A service that stopped, or a lag still there after
    ``timeout``, is an error: the demo would report alerts it had not judged yet."""
    start = time.monotonic()
    group = AlertsSettings.model_fields["alerts_group"].default  # the demo runs it with its defaults
    while (lag := lag_or_reason(bootstrap, group, ALERT_TOPICS)) != 0:
        services.check_alive()
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"the alerts service still lags after {timeout:.0f} s: {lag}")
        time.sleep(0.5)
    return time.monotonic() - start


def _fmt(v: float | None, pct: bool = False) -> str:
    if v is None:
        return "—"
    if pct:
        return f"{v * 100:+.1f}%"
    return f"{v:,.0f}" if float(v).is_integer() else f"{v:.4g}"


_VERDICT_STYLES = {"improved": "bold green", "worsened": "bold red", "no clear effect": "bold",
                   "inconclusive": "bold yellow"}


def render(result: dict) -> None:
    console = Console()
    for exp in result["experiments"]:
        table = Table(
            title=f"{exp['title']} — {exp['startup']}, {exp['district']} ({exp['id']})",
            title_justify="left",
        )
        for col in ("KPI", "window", "group", "baseline", "intervention", "change"):
            table.add_column(col, justify="left" if col in ("KPI", "group") else "right")
        for k in exp["kpis"]:
            if k["kind"] == "impact":
                continue
            for group, periods in sorted(k["groups"].items(), key=lambda g: g[0] != "treatment"):
                change = (
                    _change(k["metric"], periods.get("intervention"), periods.get("baseline"))
                    if k["kind"] == "mean"
                    else "—"
                )
                table.add_row(
                    k["kpi"],
                    f"{k['window_s']}s",
                    group,
                    _fmt(periods.get("baseline")),
                    _fmt(periods.get("intervention")),
                    change,
                )
        console.print(table)
        for k in exp["kpis"]:
            if "impact" in k:
                line, warnings = impact_line(k)
                verdict = k["impact"]["verdict"]
                head, _, tail = line.partition(f" {verdict} · ")
                style = _VERDICT_STYLES.get(verdict, "bold")
                console.print(
                    f"  {escape(head)} [{style}]{escape(verdict)}[/] · {escape(tail)}", highlight=False
                )
                for w in warnings:
                    console.print(f"      [yellow]! {escape(w)}[/]", highlight=False)
                console.print(f"      [dim]method: {escape(k['impact']['method'])}[/]", highlight=False)
        rej = ", ".join(f"{r}: {n}" for r, n in exp["rejections"].items()) or "none"
        console.print(f"  readings stored: {exp['readings_stored']}; rejections: {rej}")
        al = exp["alerts"]
        rules = ", ".join(
            f"{rule} ({r['severity']}) ×{r['fired']}" + (f", {r['firing']} still firing" if r["firing"] else "")
            for rule, r in al["by_rule"].items()
        )
        judged = ", ".join(al["rules"]) or "no rules"
        console.print(
            f"  alerts: {escape(rules) if rules else 'none fired'} [dim](rules judged: {escape(judged)})[/]",
            highlight=False,
        )
        for a in al["newest"]:
            console.print(f"      [dim]{escape(a['fired_at'][:16])} {escape(a['summary'])}[/]", highlight=False)
        console.print()
    for path in result.get("reports", []):
        console.print(f"report: {path}")
    t = result["timings"]
    console.print(
        f"{result['messages_published']} MQTT messages, {result['datapoints_accepted_expected']} datapoints, "
        f"{result['simulated_span_days']:.0f} simulated days; stack {t['stack_up_s']}s, publish {t['publish_s']}s, "
        f"drain {t['drain_s']}s, total {t['total_s']}s"
    )


def portal_text(portal: dict) -> str:
    """The portal's URL and tokens as the terminal shows them."""
    lines = [f"portal: {portal['url']} (log in with a token; API: {portal['url']}api)",
             f"  lab token (every pilot): {portal['lab_token']}"]
    if portal.get("startup"):
        lines.append(f"  startup token ({portal['startup']}: its pilot only): {portal['startup_token']}")
    return "\n".join(lines)
