"""``pilotlab report EXPERIMENT --out FILE.html``: a self-contained HTML impact report of one
pilot, for readers without Grafana (the embedded default). Inline SVG charts, no script and
no network at view time.

Sections: the impact of each impact KPI as the streams engine stored it (``streams.impact``:
device-level difference-in-differences vs the control group, or before/after without one) —
its verdict, its estimate with the 95% interval in its scale (a relative change in %, or a
difference in the metric's unit for metrics without a true zero), the devices analysed per
group, the design and method, the warnings as sentences and the placebo check — with one
forest plot per scale; treatment vs control over time (headline metric, with the two periods
shaded), baseline vs intervention per KPI and group, completeness per device, the alerts
(open now, and the recent firing/resolved history), rejections by reason. :func:`load` reads
the database through the query layer's named functions (``storage.queries``); :func:`render`
is pure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from html import escape
from pathlib import Path

import psycopg

from dashboards import impact_text as it
from pilotlab.kpi_kinds import KINDS
from pilotlab.metrics import METRICS
from storage import queries

TREATMENT = "#1f6fb4"
CONTROL = "#e08a1e"
BASELINE_BG = "#eef1f5"
INTERVENTION_BG = "#e6f2e6"
_BUCKETS = [timedelta(minutes=m) for m in (1, 5, 15, 60, 180, 360, 1440)]
ALERT_HISTORY_ROWS = 50  # the newest transitions the report lists
SEVERITY_COLOURS = {"critical": "#b91c1c", "warning": "#c2410c", "info": "#1d4ed8"}
EVENT_COLOURS = {"firing": "#b91c1c", "resolved": "#15803d"}


class ReportError(Exception):
    """The report cannot be written (unknown experiment)."""


@dataclass(frozen=True)
class Impact:
    """One impact KPI: ``details`` as the streams worker stored it
    (:meth:`streams.impact.ImpactResult.as_dict`), with the manifest's ``better`` and the
    simulation's true effect (a relative change of the signal, when the data is simulated)."""

    kpi: str
    metric: str
    details: dict
    better: str = "lower"
    true_effect: float | None = None

    @property
    def estimate(self) -> float | None:
        return self.details.get("estimate")

    @property
    def ci_low(self) -> float | None:
        return self.details.get("ci_low")

    @property
    def ci_high(self) -> float | None:
        return self.details.get("ci_high")

    @property
    def scale(self) -> str:
        return "absolute" if self.details.get("scale") == "absolute" else "relative"

    @property
    def unit(self) -> str | None:
        return self.details.get("unit") if self.scale == "absolute" else None

    @property
    def verdict(self) -> str:
        return it.verdict_of(self.details)

    @property
    def warnings(self) -> list[str]:
        return list(self.details.get("warnings") or [])

    @property
    def devices(self) -> dict[str, int]:
        return dict(self.details.get("devices") or {})

    @property
    def design(self) -> str:
        return self.details.get("design") or ("before-after" if not self.devices.get("control") else
                                              "difference-in-differences")

    @property
    def method(self) -> str:
        return self.details.get("method") or ""

    @property
    def final(self) -> bool:
        return bool(self.details.get("final"))

    @property
    def placebo(self) -> dict | None:
        return self.details.get("placebo")

    @property
    def true_scale(self) -> tuple[str, str | None]:
        """The scale of the simulation's true effect: the metric's (relative for ratio-scale
        metrics, in the unit for interval-scale ones)."""
        return it.metric_scale(self.metric)

    @property
    def truth_comparable(self) -> bool:
        """Whether the true effect is on this estimate's scale (not when a ratio-scale metric
        fell back to a difference, ``relative_undefined``)."""
        return self.true_effect is not None and self.true_scale == (self.scale, self.unit)

    def fmt(self, v: float | None, digits: int | None = None) -> str:
        """A value of this impact in its scale (``-29.1%``, ``+1.02 degC``)."""
        return it.effect(v, self.scale, self.unit, digits)


@dataclass(frozen=True)
class PeriodRow:
    kpi: str
    metric: str
    kind: str
    group: str
    baseline: float | None
    intervention: float | None

    @property
    def absolute(self) -> bool:
        """A level of a metric without a true zero (°C, dB(A)): its change is a difference."""
        m = METRICS.get(self.metric)
        return m is not None and m.scale == "interval" and self.kind in KINDS and KINDS[self.kind].level

    @property
    def change(self) -> float | None:
        """intervention / baseline − 1; intervention − baseline when :attr:`absolute`."""
        if self.baseline is None or self.intervention is None:
            return None
        if self.absolute:
            return self.intervention - self.baseline
        if self.baseline == 0:
            return None
        return self.intervention / self.baseline - 1

    def change_text(self) -> str:
        if self.absolute:
            return it.effect(self.change, "absolute", METRICS[self.metric].unit)
        return pct(self.change)


@dataclass(frozen=True)
class DeviceRow:
    device_id: str
    group: str
    kind: str
    last_seen: datetime | None
    status: str | None
    samples: int
    expected: int
    completeness: float | None


@dataclass
class ReportData:
    experiment_id: str
    title: str
    startup: str
    district: str
    baseline: tuple[datetime, datetime]
    intervention: tuple[datetime, datetime]
    generated_at: datetime
    impacts: list[Impact] = field(default_factory=list)
    periods: list[PeriodRow] = field(default_factory=list)
    series_metric: str | None = None
    series_bucket: timedelta = timedelta(hours=1)
    series: dict[str, list[tuple[datetime, float, int]]] = field(default_factory=dict)
    devices: list[DeviceRow] = field(default_factory=list)
    rejections: dict[str, int] = field(default_factory=dict)
    readings: int = 0
    open_alerts: list[queries.OpenAlert] = field(default_factory=list)
    alert_history: list[queries.AlertTransition] = field(default_factory=list)


def period_mean(points: list[tuple[datetime, float, int]], period: tuple[datetime, datetime]) -> float | None:
    """The mean over a period of bucket means, weighted by their samples."""
    inside = [(v, n) for t, v, n in points if period[0] <= t < period[1]]
    total = sum(n for _, n in inside)
    return sum(v * n for v, n in inside) / total if total else None


def pick_bucket(span: timedelta, max_points: int = 400) -> timedelta:
    """The smallest rollup bucket that keeps a series under ``max_points`` points."""
    return next((b for b in _BUCKETS if span / b <= max_points), _BUCKETS[-1])


# --- reading the database ---------------------------------------------------------------------


def load(conn: psycopg.Connection, experiment_id: str, now: datetime | None = None) -> ReportData:
    """The report's data, read through the query layer's named functions (``storage.queries``)."""
    now = now or datetime.now(UTC)
    exp = queries.experiment_info(conn, experiment_id)
    if exp is None:
        known = [e.experiment_id for e in queries.experiment_list(conn)]
        raise ReportError(
            f"no experiment {experiment_id!r} in the database (known: {', '.join(sorted(known)) or 'none'})"
        )
    manifest = exp.manifest or {}
    better = {k["name"]: k.get("better", "lower") for k in manifest.get("kpis", [])}
    truth = (manifest.get("simulation") or {}).get("true_effects", {})
    b0, b1, i0, i1 = exp.baseline_start, exp.baseline_end, exp.intervention_start, exp.intervention_end
    data = ReportData(experiment_id, exp.title, exp.startup, exp.district, (b0, b1), (i0, i1), now)

    for imp in queries.streams_impact(conn, experiment_id):
        data.impacts.append(
            Impact(imp.kpi, imp.metric, imp.details or {}, better.get(imp.kpi, "lower"), truth.get(imp.metric))
        )

    folded: dict[tuple[str, str, str, str], dict[str, float | None]] = {}
    for v in queries.kpi_period_summary(conn, experiment_id):
        folded.setdefault((v.kpi, v.metric, v.kind, v.device_group), {})[v.period] = v.value
    data.periods = [
        PeriodRow(k, m, kind, g, p.get("baseline"), p.get("intervention"))
        for (k, m, kind, g), p in sorted(folded.items(), key=lambda kv: (kv[0][0], kv[0][3] != "treatment"))
    ]

    headline = data.impacts[0].metric if data.impacts else next((p.metric for p in data.periods), None)
    t_to = min(now, i1)
    if headline is not None:
        data.series_metric = headline
        data.series_bucket = pick_bucket(t_to - b0)
        for b in queries.metric_series(conn, experiment_id, headline, bucket=data.series_bucket, start=b0, end=t_to):
            if b.mean is not None:
                data.series.setdefault(b.device_group, []).append((b.bucket, b.mean, int(b.samples)))

    data.devices = [
        DeviceRow(h.device_id, h.device_group, h.kind, h.last_seen, h.status, int(h.samples or 0),
                  int(h.expected or 0), h.completeness)
        for h in queries.device_health(conn, experiment_id, b0, t_to)
    ]  # fmt: skip
    data.rejections = {r.reason: r.rejections for r in queries.rejection_counts(conn, experiment_id)}
    data.readings = exp.readings
    data.open_alerts = queries.open_alerts(conn, experiment_id)
    data.alert_history = queries.alert_transitions(conn, experiment_id, limit=ALERT_HISTORY_ROWS)
    return data


def write_report(database_url: str, experiment_id: str, out: Path) -> Path:
    with psycopg.connect(database_url) as conn:
        data = load(conn, experiment_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(data), encoding="utf-8")
    return out


# --- formatting -------------------------------------------------------------------------------


pct = it.pct


def num(v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return "—"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.4g}"


def day(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%d %b %Y")


def verdict(imp: Impact) -> tuple[str, str]:
    """The stored verdict in plain words for the reader, and its colour."""
    v = imp.verdict
    words = {
        "improved": f"improved ({imp.better} is better)",
        "worsened": f"worsened ({imp.better} is better)",
        "no clear effect": "no clear effect (the 95% CI includes zero)",
        "inconclusive": "inconclusive (no verdict: see the warnings)",
    }[v]
    return words, it.VERDICT_COLOURS[v]


# --- SVG charts ---------------------------------------------------------------------------------


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw)
    start, stop = math.floor(lo / step), math.ceil(hi / step)
    return [round(k * step, 10) for k in range(start, stop + 1)]


def _tick_label(v: float) -> str:
    return f"{v:g}" if abs(v) < 10000 else f"{v:,.0f}"


def forest_plot(impacts: list[Impact], width: int = 860) -> str:
    """Each impact estimate as a dot with its 95% CI as a bar, around a zero line, coloured by
    its verdict (hollow dot, dashed bar: inconclusive). One axis, one scale: every impact
    drawn must share its scale and unit (:func:`forest_plots` draws one plot per scale)."""
    rows = [i for i in impacts if i.estimate is not None]
    if not rows:
        return '<p class="muted">No impact estimate yet.</p>'
    if len({(i.scale, i.unit) for i in rows}) > 1:
        raise ValueError("a forest plot cannot mix relative and absolute impacts (see forest_plots)")
    relative = rows[0].scale == "relative"
    factor = 100.0 if relative else 1.0
    unit = "%" if relative else (rows[0].unit or "")
    vals = [v for i in rows for v in (i.ci_low, i.ci_high, i.estimate) if v is not None] + [0.0]
    vals += [i.true_effect for i in rows if i.truth_comparable]
    lo, hi = min(vals), max(vals)
    pad = (hi - lo) * 0.1 or (0.05 if relative else 0.5)
    ticks = _nice_ticks((lo - pad) * factor, (hi + pad) * factor, 6)
    x0, x1, left, row_h, top = ticks[0], ticks[-1], 190, 46, 16
    height = top + row_h * len(rows) + 34

    def x(v: float) -> float:
        return left + (v * factor - x0) / (x1 - x0) * (width - left - 30)

    what = "relative changes" if relative else f"differences in {unit}"
    parts = [f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
             f'aria-label="Impact estimates ({escape(what)}) with 95% confidence intervals">']
    base = top + row_h * len(rows)
    for t in ticks:
        label = f"{t:g}%" if relative else f"{t:g}"
        parts.append(f'<line x1="{x(t / factor):.1f}" y1="{top - 6}" x2="{x(t / factor):.1f}" y2="{base}" '
                     f'stroke="#e5e7eb"/>')
        parts.append(f'<text x="{x(t / factor):.1f}" y="{base + 16}" class="tick" text-anchor="middle">{label}</text>')
    parts.append(f'<line x1="{x(0):.1f}" y1="{top - 8}" x2="{x(0):.1f}" y2="{base}" stroke="#111" stroke-width="1.5"/>')
    parts.append(f'<text x="{x(0):.1f}" y="{base + 30}" class="tick" text-anchor="middle">no effect</text>')
    if not relative:
        parts.append(f'<text x="{width - 30}" y="{base + 30}" class="tick" text-anchor="end">{escape(unit)}</text>')
    for n, imp in enumerate(rows):
        y = top + row_h * n + row_h / 2
        colour = it.VERDICT_COLOURS[imp.verdict]
        hollow = imp.verdict == "inconclusive"
        parts.append(f'<text x="{left - 12}" y="{y - 1:.1f}" text-anchor="end" class="label">{escape(imp.kpi)}</text>')
        parts.append(f'<text x="{left - 12}" y="{y + 13:.1f}" text-anchor="end" class="verdict" fill="{colour}">'
                     f'{it.VERDICT_SYMBOLS[imp.verdict]} {escape(imp.verdict)}</text>')
        if imp.ci_low is not None and imp.ci_high is not None:
            dash = ' stroke-dasharray="7 5"' if hollow else ""
            parts.append(f'<line x1="{x(imp.ci_low):.1f}" y1="{y:.1f}" x2="{x(imp.ci_high):.1f}" y2="{y:.1f}" '
                         f'stroke="{colour}" stroke-width="4" stroke-linecap="round"{dash}/>')
        fill = f'fill="#fff" stroke="{colour}" stroke-width="3"' if hollow else f'fill="{colour}"'
        parts.append(f'<circle cx="{x(imp.estimate):.1f}" cy="{y:.1f}" r="7" {fill}/>')
        parts.append(f'<text x="{x(imp.estimate):.1f}" y="{y - 11:.1f}" text-anchor="middle" class="value">'
                     f'{escape(imp.fmt(imp.estimate))}</text>')
        if imp.truth_comparable:
            tx = x(imp.true_effect)
            parts.append(f'<path d="M{tx:.1f},{y + 9:.1f} l-6,9 h12 z" fill="none" stroke="#111" stroke-width="1.5">'
                         f'<title>simulated true effect {escape(imp.fmt(imp.true_effect))}</title></path>')
    parts.append("</svg>")
    return "".join(parts)


def forest_plots(impacts: list[Impact], width: int = 860) -> str:
    """One forest plot per scale: relative impacts on a % axis, absolute ones on an axis in
    their unit (one per unit) — a relative and an absolute effect never share an axis."""
    groups: dict[tuple[str, str | None], list[Impact]] = {}
    for imp in impacts:
        if imp.estimate is not None:
            groups.setdefault((imp.scale, imp.unit), []).append(imp)
    if not groups:
        return '<p class="muted">No impact estimate yet.</p>'
    out = []
    for (scale, unit), rows in sorted(groups.items(), key=lambda g: (g[0][0] != "relative", g[0][1] or "")):
        caption = ("Relative change, % (ratio-scale metrics)" if scale == "relative"
                   else f"Difference in {unit} (a metric without a true zero: a change in its unit, not in %)")
        out.append(f'<h3 class="plot">{escape(caption)}</h3>{forest_plot(rows, width)}')
    return "".join(out)


def line_chart(series: dict[str, list[tuple[datetime, float, int]]], baseline: tuple[datetime, datetime],
               intervention: tuple[datetime, datetime], unit: str, *,
               means: dict[tuple[str, str], float | None] | None = None, width: int = 860, height: int = 300) -> str:
    """Treatment and control over time, the baseline and intervention periods shaded."""
    points = [p for s in series.values() for p in s]
    if not points:
        return '<p class="muted">No readings stored for this metric yet.</p>'
    t0, t1 = baseline[0], max([intervention[1], *(p[0] for p in points)])
    vs = [p[1] for p in points]
    ticks = _nice_ticks(min(0.0, *vs), max(vs), 5)
    lo, hi = ticks[0], ticks[-1]
    left, right, top, bottom = 64, 16, 28, 40
    span = (t1 - t0).total_seconds() or 1

    def x(t: datetime) -> float:
        return left + (t - t0).total_seconds() / span * (width - left - right)

    def y(v: float) -> float:
        return top + (hi - v) / ((hi - lo) or 1) * (height - top - bottom)

    parts = [f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
             f'aria-label="Treatment vs control over time">']
    for (a, b), bg, name in ((baseline, BASELINE_BG, "baseline"), (intervention, INTERVENTION_BG, "intervention")):
        xa, xb = max(x(a), left), min(x(b), width - right)
        if xb > xa:
            parts.append(f'<rect x="{xa:.1f}" y="{top}" width="{xb - xa:.1f}" height="{height - top - bottom}" '
                         f'fill="{bg}"/>')
            parts.append(f'<text x="{(xa + xb) / 2:.1f}" y="{top - 10}" text-anchor="middle" class="period">'
                         f'{name}</text>')
    for t in ticks:
        parts.append(f'<line x1="{left}" y1="{y(t):.1f}" x2="{width - right}" y2="{y(t):.1f}" stroke="#d1d5db" '
                     f'stroke-width="0.6"/>')
        parts.append(f'<text x="{left - 6}" y="{y(t) + 4:.1f}" text-anchor="end" class="tick">{_tick_label(t)}</text>')
    days = max(1, round(span / 86400 / 7))
    d = t0.replace(hour=0, minute=0, second=0, microsecond=0)
    while d <= t1:
        if d >= t0 and x(d) <= width - right - 18:  # no label cut by the right edge
            parts.append(f'<text x="{x(d):.1f}" y="{height - bottom + 16}" text-anchor="middle" class="tick">'
                         f'{d.strftime("%d %b")}</text>')
            parts.append(f'<line x1="{x(d):.1f}" y1="{height - bottom}" x2="{x(d):.1f}" y2="{height - bottom + 4}" '
                         f'stroke="#6b7280"/>')
        d += timedelta(days=days)
    parts.append(f'<line x1="{x(intervention[0]):.1f}" y1="{top}" x2="{x(intervention[0]):.1f}" '
                 f'y2="{height - bottom}" stroke="#374151" stroke-dasharray="4 3"/>')
    parts.append(f'<text x="{left}" y="{height - 4}" class="tick">{escape(unit)}</text>')
    for group, colour in (("control", CONTROL), ("treatment", TREATMENT)):
        s = sorted(series.get(group, []))
        if not s:
            continue
        path = " ".join(f"{'M' if i == 0 else 'L'}{x(t):.1f},{y(v):.1f}" for i, (t, v, _) in enumerate(s))
        parts.append(f'<path d="{path}" fill="none" stroke="{colour}" stroke-width="1.2" stroke-opacity="0.45"/>')
    for name, period in (("baseline", baseline), ("intervention", intervention)):
        found = {}
        for group in ("control", "treatment"):
            m = (means or {}).get((group, name), period_mean(series.get(group, []), period))
            if m is not None:
                found[group] = m
        top_group = max(found, key=found.get) if len(found) > 1 else None
        xa, xb = max(x(period[0]), left), min(x(period[1]), width - right)
        for group, m in found.items():
            colour = TREATMENT if group == "treatment" else CONTROL
            dy = -6 if group == top_group else 14  # the higher line's label above it, the other's below
            parts.append(f'<line x1="{xa:.1f}" y1="{y(m):.1f}" x2="{xb:.1f}" y2="{y(m):.1f}" stroke="{colour}" '
                         f'stroke-width="3.5"/>')
            parts.append(f'<text x="{xb - 6:.1f}" y="{y(m) + dy:.1f}" text-anchor="end" class="value">'
                         f'{group} {num(m)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def period_bars(rows: list[PeriodRow], width: int = 400, height: int = 190) -> str:
    """One KPI: baseline and intervention bars for each group, with the change above."""
    groups = [r for r in rows if r.baseline is not None or r.intervention is not None]
    if not groups:
        return ""
    vals = [v for r in groups for v in (r.baseline, r.intervention) if v is not None]
    top_v = _nice_ticks(min(0.0, *vals), max(vals), 4)[-1] or 1
    left, top, bottom = 10, 30, 40
    slot = (width - left * 2) / len(groups)
    bar = min(54, slot / 3)
    parts = [f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img">']
    base = height - bottom
    for n, r in enumerate(groups):
        cx = left + slot * n + slot / 2
        colour = TREATMENT if r.group == "treatment" else CONTROL
        for k, (label, v, opacity) in enumerate((("before", r.baseline, 0.45), ("during", r.intervention, 1.0))):
            if v is None:
                continue
            h = max(v, 0) / top_v * (base - top)
            bx = cx - bar - 2 + k * (bar + 4)
            parts.append(f'<rect x="{bx:.1f}" y="{base - h:.1f}" width="{bar:.1f}" height="{h:.1f}" fill="{colour}" '
                         f'fill-opacity="{opacity}"/>')
            parts.append(f'<text x="{bx + bar / 2:.1f}" y="{base - h - 4:.1f}" text-anchor="middle" class="tick">'
                         f'{num(v)}</text>')
            parts.append(f'<text x="{bx + bar / 2:.1f}" y="{base + 13}" text-anchor="middle" class="tick">{label}'
                         f'</text>')
        parts.append(f'<text x="{cx:.1f}" y="{base + 30}" text-anchor="middle" class="label">{escape(r.group)} '
                     f'<tspan class="muted">{r.change_text()}</tspan></text>')
    parts.append(f'<line x1="{left}" y1="{base}" x2="{width - left}" y2="{base}" stroke="#6b7280"/>')
    parts.append("</svg>")
    return "".join(parts)


def hbars(items: list[tuple[str, float, str]], value_fmt, width: int = 420, max_value: float | None = None,
          row_h: int = 22) -> str:
    """Horizontal bars: (label, value, colour)."""
    if not items:
        return '<p class="muted">None.</p>'
    left = 170
    top_v = max_value or max(v for _, v, _ in items) or 1
    height = row_h * len(items) + 6
    parts = [f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img">']
    for n, (label, v, colour) in enumerate(items):
        yy = n * row_h + 3
        w = max(v, 0) / top_v * (width - left - 70)
        parts.append(f'<text x="{left - 8}" y="{yy + 14}" text-anchor="end" class="label">{escape(label)}</text>')
        parts.append(f'<rect x="{left}" y="{yy + 3}" width="{w:.1f}" height="{row_h - 8}" fill="{colour}"/>')
        parts.append(f'<text x="{left + w + 6:.1f}" y="{yy + 14}" class="tick">{value_fmt(v)}</text>')
    parts.append("</svg>")
    return "".join(parts)


# --- the page ------------------------------------------------------------------------------------

_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:#111827;margin:0;
background:#f7f7f5}
main{max-width:900px;margin:0 auto;padding:28px 20px 60px}
h1{font-size:26px;margin:0 0 4px} h2{font-size:19px;margin:34px 0 6px;border-bottom:1px solid #e5e7eb;
padding-bottom:4px} h3{font-size:15px;margin:14px 0 2px}
.sub{color:#4b5563;margin:0 0 14px}.muted{color:#6b7280}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:12px 0}
.card{background:#fff;border:1px solid #e5e7eb;border-radius:8px;padding:12px 16px;min-width:240px;flex:1}
.card .big{font-size:30px;font-weight:700}.card .small{font-size:13px;color:#4b5563;margin:2px 0}
.card.impact{min-width:380px;border-top:5px solid #e5e7eb}
.verdict-badge{display:inline-block;color:#fff;font-weight:700;font-size:14px;border-radius:12px;
padding:2px 12px;margin:6px 0 2px;text-transform:uppercase;letter-spacing:.03em}
.warn{margin:6px 0 4px;padding-left:18px;font-size:13px;color:#7c2d12}.warn li{margin:2px 0}
.method{font-size:12px;color:#6b7280;margin-top:6px}
h3.plot{font-size:13px;font-weight:600;color:#374151;margin:12px 0 0}.verdict{font-size:11px;font-weight:600}
table{border-collapse:collapse;font-size:13px;background:#fff;width:100%}
th,td{padding:4px 8px;border-bottom:1px solid #eceff3;text-align:right}th{background:#f3f4f6}
td:first-child,th:first-child,td.l,th.l{text-align:left}
svg{display:block;background:#fff;border:1px solid #e5e7eb;border-radius:6px;margin:6px 0}
svg text{font-family:inherit}.tick{font-size:11px;fill:#4b5563}.label{font-size:12px;fill:#111827}
.value{font-size:12px;font-weight:700;fill:#111827}.period{font-size:12px;fill:#374151;font-weight:600}
.legend span{display:inline-block;width:14px;height:4px;margin:0 5px 3px 12px;vertical-align:middle}
.grid{display:flex;flex-wrap:wrap;gap:10px}.grid>div{flex:0 0 430px}
footer{margin-top:40px;font-size:12px;color:#6b7280}
"""


def _placebo_line(imp: Impact) -> str:
    """The placebo check: the same analysis of the baseline's second half against its first."""
    p = imp.placebo
    what = "Placebo check (baseline, 2nd half vs 1st half)"
    if not p or p.get("estimate") is None:
        return f'<div class="small">{what}: not available (too few readings in the baseline halves)</div>'
    digits = it.decimals(imp.estimate, imp.ci_low, imp.ci_high) if imp.scale == "absolute" else None
    text = it.estimate_with_interval({**p, "scale": imp.scale, "unit": imp.unit}, digits=digits)
    if "placebo_shift" in imp.warnings:
        status, colour = "failed: the baseline already shifted before the intervention", it.VERDICT_COLOURS["worsened"]
    elif p.get("ci_low") is None:
        status, colour = "no interval", it.VERDICT_COLOURS["no clear effect"]
    else:
        status, colour = "passed (its 95% CI includes zero)", it.VERDICT_COLOURS["improved"]
    return (f'<div class="small">{what}: {escape(text)} — '
            f'<span style="color:{colour};font-weight:600">{escape(status)}</span></div>')


def _devices_line(imp: Impact) -> str:
    d, r = imp.devices, imp.details.get("readings") or {}

    def readings(g: str) -> str:
        n = sum((r.get(g) or {}).values())
        return f" ({n:,} readings)" if n else ""

    if imp.design == "before-after":
        t = d.get("treatment", 0)
        return (f'<div class="small">Devices analysed: <b>{t}</b> treatment{readings("treatment")}, '
                f"no control group</div>")
    return (f'<div class="small">Devices analysed: <b>{d.get("treatment", 0)}</b> treatment{readings("treatment")} '
            f'vs <b>{d.get("control", 0)}</b> control{readings("control")}</div>')


def _impact_card(imp: Impact) -> str:
    words, colour = verdict(imp)
    d = it.decimals(imp.estimate, imp.ci_low, imp.ci_high) if imp.scale == "absolute" else None
    if imp.ci_low is not None and imp.ci_high is not None:
        ci = f"95% CI {it.interval(imp.ci_low, imp.ci_high, imp.scale, imp.unit, imp.estimate)}"
    else:
        ci = "no 95% CI (too few devices)" if imp.estimate is not None else "no estimate yet"
    scale = it.scale_label(imp.scale, imp.unit)
    status = "final" if imp.final else "interim: the intervention has not ended"
    if imp.true_effect is None:
        truth = ""
    else:
        other = "" if imp.truth_comparable else " (on another scale than this estimate)"
        truth = (f'<div class="small">Simulated true effect '
                 f"{escape(it.effect(imp.true_effect, *imp.true_scale))}{other}</div>")
    warnings = "".join(f"<li>{escape(w)}</li>" for w in it.sentences(imp.warnings))
    warnings_html = (f'<ul class="warn">{warnings}</ul>' if warnings
                     else '<div class="small muted">No warnings.</div>')
    return (
        f'<div class="card impact" style="border-top-color:{colour}">'
        f'<div class="small">{escape(imp.kpi)} · {escape(imp.metric)}</div>'
        f'<div class="verdict-badge" style="background:{colour}">{it.VERDICT_SYMBOLS[imp.verdict]} '
        f"{escape(imp.verdict)}</div>"
        f'<div class="big" style="color:{colour}">{escape(imp.fmt(imp.estimate, d))}</div>'
        f'<div class="small">{escape(ci)} · {escape(scale)}</div>'
        f'<div class="small" style="color:{colour}">{escape(words)}</div>'
        f"{_devices_line(imp)}"
        f'<div class="small">Design: {escape(imp.design)} · {escape(status)}</div>'
        f"{_placebo_line(imp)}{truth}{warnings_html}"
        f'<div class="method">Method: {escape(imp.method or "—")}.</div>'
        "</div>"
    )


def _impact_cards(data: ReportData) -> str:
    if not data.impacts:
        return '<p class="muted">This experiment declares no impact KPI.</p>'
    return f'<div class="cards">{"".join(_impact_card(imp) for imp in data.impacts)}</div>'


def _period_section(data: ReportData) -> str:
    by_kpi: dict[str, list[PeriodRow]] = {}
    for r in data.periods:
        by_kpi.setdefault(r.kpi, []).append(r)
    if not by_kpi:
        return '<p class="muted">No KPI windows stored yet.</p>'
    charts = []
    for kpi, rows in by_kpi.items():
        if rows[0].kind not in KINDS or not KINDS[rows[0].kind].chart:
            continue
        charts.append(f'<div><h3>{escape(kpi)} <span class="muted">({escape(rows[0].kind)} of '
                      f'{escape(rows[0].metric)})</span></h3>{period_bars(rows)}</div>')
    table_rows = "".join(
        f'<tr><td>{escape(r.kpi)}</td><td class="l">{escape(r.kind)}</td><td class="l">{escape(r.group)}</td>'
        f"<td>{num(r.baseline)}</td><td>{num(r.intervention)}</td><td>{r.change_text()}</td></tr>"
        for r in data.periods
    )
    return (
        '<p class="muted">Lighter bar: baseline (before); darker bar: intervention (during). '
        "Means weighted by samples; the change is intervention / baseline − 1 (intervention − baseline, in the "
        "metric's unit, for the levels of metrics without a true zero such as °C or dB(A)).</p>"
        f'<div class="grid">{"".join(charts)}</div>'
        '<h3>All KPIs</h3><table><tr><th>KPI</th><th class="l">kind</th><th class="l">group</th>'
        f"<th>baseline</th><th>intervention</th><th>change</th></tr>{table_rows}</table>"
    )


def _completeness_section(data: ReportData) -> str:
    if not data.devices:
        return '<p class="muted">No devices registered.</p>'
    items = [
        (f"{d.device_id} ({d.group[0]})", (d.completeness or 0) * 100, TREATMENT if d.group == "treatment" else CONTROL)
        for d in data.devices
    ]
    groups = {}
    for d in data.devices:
        s, e = groups.get(d.group, (0, 0))
        groups[d.group] = (s + d.samples, e + d.expected)
    summary = "; ".join(f"{g}: {s / e * 100:.1f}% ({s:,} of {e:,} samples)" for g, (s, e) in groups.items() if e)
    rows = "".join(
        f'<tr><td>{escape(d.device_id)}</td><td class="l">{escape(d.group)}</td><td class="l">{escape(d.kind)}</td>'
        f'<td>{d.last_seen.strftime("%Y-%m-%d %H:%M") if d.last_seen else "never"}</td>'
        f'<td class="l">{escape(d.status or "—")}</td><td>{d.samples:,}</td><td>{d.expected:,}</td>'
        f"<td>{'—' if d.completeness is None else f'{d.completeness * 100:.1f}%'}</td></tr>"
        for d in data.devices
    )
    return (
        f'<p>Samples received / samples expected from each device\'s interval, baseline start to '
        f"{'now' if data.generated_at < data.intervention[1] else 'intervention end'}. {escape(summary)}.</p>"
        + hbars(items, lambda v: f"{v:.1f}%", width=860, max_value=100)
        + '<p class="muted">Status: the last the streams worker reported for the device (online from its first '
        "reading, offline when silent, online when back; — : none reported).</p>"
        + '<table><tr><th>device</th><th class="l">group</th><th class="l">kind</th><th>last seen (UTC)</th>'
        f'<th class="l">status</th><th>samples</th><th>expected</th><th>completeness</th></tr>{rows}</table>'
    )


def _badge(text: str, colour: str) -> str:
    return f'<span style="color:{colour};font-weight:700">{escape(text)}</span>'


def _when(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _alerts_section(data: ReportData) -> str:
    """The alerts still firing, and the newest firing/resolved transitions (docs/alerts.md)."""
    by_severity = {s: sum(a.severity == s for a in data.open_alerts) for s in SEVERITY_COLOURS}
    counts = ", ".join(f"{n} {s}" for s, n in by_severity.items() if n)
    intro = (
        f"<p><b>{len(data.open_alerts)}</b> alert{'s' if len(data.open_alerts) != 1 else ''} firing"
        f"{f' ({counts})' if counts else ''}. Times are the event times the rules judged (UTC).</p>"
    )
    if data.open_alerts:
        rows = "".join(
            f"<tr><td>{_badge(a.severity, SEVERITY_COLOURS.get(a.severity, '#111'))}</td>"
            f'<td class="l">{escape(a.rule)}</td><td class="l">{escape(a.subject)}</td>'
            f"<td>{_when(a.fired_at)}</td><td>{num(a.value)}</td><td>{num(a.threshold)}</td>"
            f'<td class="l">{escape(a.summary)}</td></tr>'
            for a in data.open_alerts
        )
        open_html = (
            '<h3>Open alerts</h3><table><tr><th class="l">severity</th><th class="l">rule</th>'
            '<th class="l">subject</th><th>firing since</th><th>value</th><th>threshold</th>'
            f'<th class="l">summary</th></tr>{rows}</table>'
        )
    else:
        open_html = '<h3>Open alerts</h3><p class="muted">No alert is firing.</p>'
    if data.alert_history:
        rows = "".join(
            f"<tr><td>{_when(t.at)}</td><td>{_badge(t.event, EVENT_COLOURS.get(t.event, '#111'))}</td>"
            f"<td>{_badge(t.severity, SEVERITY_COLOURS.get(t.severity, '#111'))}</td>"
            f'<td class="l">{escape(t.rule)}</td><td class="l">{escape(t.subject)}</td>'
            f'<td class="l">{escape(t.summary or "")}</td></tr>'
            for t in data.alert_history
        )
        shown = (f"the newest {len(data.alert_history)}" if len(data.alert_history) >= ALERT_HISTORY_ROWS
                 else "every transition")  # fmt: skip
        history_html = (
            f'<h3>Recent history</h3><p class="muted">Alerts fired and resolved, newest first ({shown}).</p>'
            '<table><tr><th>time (UTC)</th><th>event</th><th>severity</th><th class="l">rule</th>'
            f'<th class="l">subject</th><th class="l">summary</th></tr>{rows}</table>'
        )
    else:
        history_html = '<h3>Recent history</h3><p class="muted">No alert has fired.</p>'
    return intro + open_html + history_html


def headline_means(data: ReportData) -> dict[tuple[str, str], float | None]:
    """The period means of the headline metric as the streams engine folded them (its first mean
    KPI by name), so that the chart's thick lines agree with the tables."""
    rows = [r for r in data.periods if r.kind == "mean" and r.metric == data.series_metric]
    out: dict[tuple[str, str], float | None] = {}
    for r in sorted(rows, key=lambda r: r.kpi):
        out.setdefault((r.group, "baseline"), r.baseline)
        out.setdefault((r.group, "intervention"), r.intervention)
    return {k: v for k, v in out.items() if v is not None}


def render(data: ReportData) -> str:
    rej_total = sum(data.rejections.values())
    rej = hbars(sorted(((r, float(n), "#9ca3af") for r, n in data.rejections.items()), key=lambda i: -i[1]),
                lambda v: f"{v:,.0f}", width=860)
    unit = data.series_metric or ""
    bucket = data.series_bucket
    bucket_txt = f"{int(bucket.total_seconds() // 3600)} h" if bucket >= timedelta(hours=1) else \
        f"{int(bucket.total_seconds() // 60)} min"
    unit_txt = METRICS[unit].unit if unit in METRICS else ""
    has_control = any(d.group == "control" for d in data.devices) or any(
        i.design == "difference-in-differences" for i in data.impacts)
    impact_intro = (
        "Each device's change from its baseline mean to its intervention mean; the effect is the treatment "
        "devices' mean change minus the control devices' (difference-in-differences: what the weather, the "
        "season and the city's trends did to both groups cancels), with a 95% confidence interval across devices."
        if has_control
        else "Each treatment device's change from its baseline mean to its intervention mean, with a 95% "
        "confidence interval across devices. This pilot has no control group: the change also includes whatever "
        "else changed over those weeks, so no verdict is given."
    ) + (
        " In % for metrics with a true zero, in the metric's unit for the others (°C, dB(A)). A verdict is given "
        "only when the design can carry it; the warnings under each estimate say why it is withheld or weakened."
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(data.title)} — pilot impact report</title>
<style>{_CSS}</style></head>
<body><main>
<h1>{escape(data.title)}</h1>
<p class="sub">{escape(data.startup)} · {escape(data.district)} · <code>{escape(data.experiment_id)}</code><br>
Baseline {day(data.baseline[0])} – {day(data.baseline[1])} · Intervention {day(data.intervention[0])} –
{day(data.intervention[1])}</p>

<h2>Impact</h2>
<p class="muted">{impact_intro}</p>
{_impact_cards(data)}
{forest_plots(data.impacts)}
<p class="muted">Dot: estimate; bar: 95% CI; colour: the verdict (hollow dot and dashed bar: inconclusive);
triangle: the simulation's true effect, when the data is simulated.</p>

<h2>{"Treatment vs control over time" if has_control else "Treatment over time (no control group)"}</h2>
<p class="legend">{escape(unit)} ({escape(unit_txt)}); thin: mean per {bucket_txt}; thick: mean of each period.
<span style="background:{TREATMENT}"></span>treatment
{f'<span style="background:{CONTROL}"></span>control' if has_control else ""}</p>
{line_chart(data.series, data.baseline, data.intervention, f"{unit} {unit_txt}", means=headline_means(data))}

<h2>Baseline vs intervention</h2>
{_period_section(data)}

<h2>Completeness</h2>
{_completeness_section(data)}

<h2>Alerts</h2>
{_alerts_section(data)}

<h2>Rejections</h2>
<p>{rej_total:,} messages or batch items refused, with the reason code sent back to the device;
{data.readings:,} datapoints stored.</p>
{rej}

<footer>Generated {data.generated_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")} by
<code>pilotlab report</code> from the pilotlab database (KPIs as the streams engine last revised them).
</footer>
</main></body></html>
"""
