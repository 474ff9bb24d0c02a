"""Pure helpers of the portal: what a page and the API show, from the query layer's rows.
No I/O here (the app reads the database, these shape and format)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from dashboards import impact_text as it
from pilotlab.contracts import feedback_topic, telemetry_topic
from pilotlab.credentials import MqttEndpoint, derive_password
from storage.portal_queries import ImpactKpi


@dataclass(frozen=True)
class ImpactView:
    """An impact KPI as people read it: its verdict and the estimate with its 95% interval in
    its scale (``-29.1% [95% CI -33.0% … -25.0%]``), the devices analysed, the warnings."""

    kpi: str
    metric: str
    verdict: str
    symbol: str
    colour: str
    estimate: float | None
    ci_low: float | None
    ci_high: float | None
    scale: str
    unit: str | None
    text: str
    devices: str
    design: str | None
    warnings: list[str]
    final: bool
    revision: int
    details: dict


def impact_view(row: ImpactKpi) -> ImpactView:
    d = row.details or {}
    verdict = it.verdict_of(d)
    return ImpactView(
        kpi=row.kpi,
        metric=row.metric,
        verdict=verdict,
        symbol=it.VERDICT_SYMBOLS[verdict],
        colour=it.VERDICT_COLOURS[verdict],
        estimate=d.get("estimate"),
        ci_low=d.get("ci_low"),
        ci_high=d.get("ci_high"),
        scale="absolute" if d.get("scale") == "absolute" else "relative",
        unit=d.get("unit"),
        text=it.estimate_with_interval(d) if d else "no estimate yet",
        devices=it.devices(d.get("devices"), d.get("design")),
        design=d.get("design"),
        warnings=it.sentences(d.get("warnings")),
        final=bool(d.get("final")),
        revision=row.revision,
        details=dict(d),
    )


@dataclass(frozen=True)
class DeviceCredential:
    """What a startup needs to connect one device (as ``pilotlab credentials show`` prints)."""

    device_id: str
    host: str
    port: int
    tls: bool
    username: str
    password: str
    publish_to: str
    feedback_from: str


def device_credentials(
    experiment_id: str, device_ids: Iterable[str], secret: bytes, broker_url: str
) -> list[DeviceCredential]:
    """Each device's MQTT account: its password derives from the lab's secret
    (:func:`pilotlab.credentials.derive_password`); the broker's address comes without the
    lab's own user and password, which ``broker_url`` may carry."""
    ep = MqttEndpoint.parse(broker_url)
    return [
        DeviceCredential(
            device_id=d,
            host=ep.host,
            port=ep.port,
            tls=ep.tls,
            username=d,
            password=derive_password(secret, d),
            publish_to=telemetry_topic(experiment_id, d),
            feedback_from=feedback_topic(experiment_id, d),
        )
        for d in sorted(device_ids)
    ]


def pct(v: float | None, digits: int = 1) -> str:
    """A share as an unsigned percentage: 0.9731 → ``97.3%``; ``—`` when unknown."""
    if v is None or not math.isfinite(v):
        return "—"
    return f"{v * 100:.{digits}f}%"


def when(t: datetime | None, now: datetime | None = None) -> str:
    """``2026-12-02 13:05:09 UTC (3 min ago)``; ``never`` for None."""
    if t is None:
        return "never"
    now = now or datetime.now(UTC)
    return f"{t.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC ({ago(t, now)})"


def ago(t: datetime, now: datetime) -> str:
    """How long before ``now``: ``12 s ago``, ``3 min ago``, ``5 h ago``, ``4 d ago``; ``in 2 min``."""
    s = (now - t).total_seconds()
    future = s < 0
    s = abs(s)
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if s >= size:
            text = f"{int(s // size)} {unit}"
            break
    else:
        text = f"{int(s)} s"
    return f"in {text}" if future else f"{text} ago"


def excerpt(text: str | None, limit: int = 120) -> str:
    """At most ``limit`` characters of a payload excerpt, one line, ``…`` when cut."""
    flat = " ".join((text or "").split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"

