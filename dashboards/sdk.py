"""Shared pieces of the dashboards, built with grafana-foundation-sdk (Grafana's own builders).

The SDK has no PostgreSQL query type, so :class:`SqlTarget` is a small builder producing the
target Grafana's PostgreSQL datasource stores (``rawSql``, ``format``, code editor mode).
Every SQL panel queries the provisioned datasource ``pilotlab-db`` (deploy/grafana/provisioning),
which connects as the read-only ``grafana_reader`` role; the services' own metrics (consumer lag)
come from the provisioned Prometheus, ``pilotlab-prometheus`` (:func:`prom_target`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from grafana_foundation_sdk.builders import common, prometheus
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cmodel
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models import prometheus as prom_model

DATASOURCE_UID = "pilotlab-db"
DATASOURCE_TYPE = "grafana-postgresql-datasource"
DATASOURCE = model.DataSourceRef(type_val=DATASOURCE_TYPE, uid=DATASOURCE_UID)
# Prometheus scraping ingest, streams and sink (docker-compose; deploy/prometheus/prometheus.yml)
PROMETHEUS_UID = "pilotlab-prometheus"
PROMETHEUS = model.DataSourceRef(type_val="prometheus", uid=PROMETHEUS_UID)
TAGS = ["pilotlab"]
# the dashboard schemaVersion of the Grafana docker-compose runs (11.1: 39, its defaultDashboard's),
# the one it loads without migrating; dashboards/schema/grafana-dashboard.schema.json records it
GRAFANA_SCHEMA_VERSION = 39

# what each panel type needs from its query's result (checked against the real database)
TIME_SERIES = "time_series"
TABLE = "table"


@dataclass
class SqlQuery(cogvariants.Dataquery):
    """One PostgreSQL target as Grafana stores it in a dashboard model."""

    ref_id: str
    raw_sql: str
    format: str = TABLE

    def to_json(self) -> dict[str, object]:
        return {
            "refId": self.ref_id,
            "datasource": {"type": DATASOURCE_TYPE, "uid": DATASOURCE_UID},
            "editorMode": "code",
            "format": self.format,
            "rawQuery": True,
            "rawSql": self.raw_sql,
        }


class SqlTarget(cogbuilder.Builder[cogvariants.Dataquery]):
    def __init__(self, raw_sql: str, fmt: str = TABLE, ref_id: str = "A") -> None:
        self._internal = SqlQuery(ref_id=ref_id, raw_sql=_dedent(raw_sql), format=fmt)

    def build(self) -> SqlQuery:
        return self._internal


def prom_target(expr: str, legend: str, ref_id: str = "A") -> prometheus.Dataquery:
    """A PromQL range query on the provisioned Prometheus."""
    return (
        prometheus.Dataquery()
        .expr(expr)
        .legend_format(legend)
        .ref_id(ref_id)
        .range()
        .editor_mode(prom_model.QueryEditorMode.CODE)
        .format(prom_model.PromQueryFormat.TIME_SERIES)
        .datasource(PROMETHEUS)
    )


def _dedent(sql_text: str) -> str:
    import textwrap  # noqa: PLC0415

    return textwrap.dedent(sql_text).strip()


def experiment_variable() -> dash.QueryVariable:
    """``$experiment``: one experiment at a time, chosen from ``experiment_list()``."""
    return (
        dash.QueryVariable("experiment")
        .label("Experiment")
        .datasource(DATASOURCE)
        .query("SELECT title AS __text, experiment_id AS __value FROM experiment_list()")
        .refresh(model.VariableRefresh.ON_DASHBOARD_LOAD)
        .sort(model.VariableSort.ALPHABETICAL_ASC)
    )


def grid(x: int, y: int, w: int, h: int) -> model.GridPos:
    return model.GridPos(h=h, w=w, x=x, y=y)


def to_model(builder: dash.Dashboard) -> dict:
    """The dashboard's JSON model as a plain dict (what Grafana's API and files take), with
    stable panel ids (1, 2, ... in layout order) so that links to a panel keep working, in the
    shape Grafana's dashboard schema wants (:func:`for_grafana`)."""
    out = json.loads(json.dumps(builder.build(), cls=JSONEncoder))
    for i, panel in enumerate(out.get("panels", []), start=1):
        panel["id"] = i
    return for_grafana(out)


def for_grafana(model: dict) -> dict:
    """What grafana-foundation-sdk writes that Grafana's dashboard schema (of the Grafana we run,
    ``GRAFANA_SCHEMA_VERSION``) does not take, fixed (``dashboards/validate.py`` checks it):

    - ``"options": null`` on a panel none of whose options were set: ``{}``, on which Grafana
      applies the panel plugin's defaults (what it did with ``null``);
    - the top-level ``style`` (the dashboard theme), removed from the schema in Grafana 10.2;
    - on every variable, ``id`` (a runtime key of Grafana's variable store, the same all-zero
      uuid on each variable) and, except on interval variables, the interval variable's
      ``auto``, ``auto_min`` and ``auto_count``;
    - ``schemaVersion`` 36: Grafana would migrate the model from 36 on every load.
    """
    model.pop("style", None)
    model["schemaVersion"] = GRAFANA_SCHEMA_VERSION
    for panel in model.get("panels", []):
        if panel.get("options") is None and panel.get("type") != "row":
            panel["options"] = {}
    for var in model.get("templating", {}).get("list", []):
        var.pop("id", None)
        if var.get("type") != "interval":
            for key in ("auto", "auto_min", "auto_count"):
                var.pop(key, None)
    return model


def all_values() -> common.ReduceDataOptions:
    """Stat panels show one value per row of their table query (not only the last)."""
    return common.ReduceDataOptions().values(True).calcs(["lastNotNull"]).fields("")


def device_markers() -> list[common.MapLayerOptions]:
    """A geomap markers layer placed by the query's ``latitude``/``longitude`` columns."""
    return [
        common.MapLayerOptions()
        .type("markers")
        .name("devices")
        .location(
            common.FrameGeometrySource()
            .mode(cmodel.FrameGeometrySourceMode.COORDS)
            .latitude("latitude")
            .longitude("longitude")
        )
        .tooltip(True)
        .config({"showLegend": True, "style": {"size": {"fixed": 8}, "color": {"field": "device_group"}}})
    ]


def variable_query(var: dict) -> str:
    """The SQL of a query variable (Grafana stores it as a string or as {query: ...})."""
    q = var.get("query")
    return q.get("query", "") if isinstance(q, dict) else str(q)


def dashboard(title: str, uid: str, doc: str, time_from: str, refresh: str = "1m"):
    """A dashboard with pilotlab's common header: stable UID, tags, the module docstring's
    first paragraph as description, UTC, a time range ending now."""
    return (
        dash.Dashboard(title)
        .uid(uid)
        .tags(TAGS)
        .description(doc.split("\n\n", maxsplit=1)[0].replace("\n", " "))
        .time(time_from, "now")
        .refresh(refresh)
        .timezone("utc")
    )


# a device's status in a panel over ``device_health(...) h``: the streams worker's, else why not
DEVICE_STATUS_SQL = "coalesce(h.status, CASE WHEN h.last_seen IS NULL THEN 'never reported' ELSE 'no status yet' END)"

SEVERITY_COLOURS = {"critical": "red", "warning": "orange", "info": "blue"}
EVENT_COLOURS = {"firing": "red", "resolved": "green"}


def coloured_column(colours: dict[str, str]) -> list[model.DynamicConfigValue]:
    """Field overrides for a table's text column whose values each have a colour (an alert's
    severity, a transition's event)."""
    mapping = model.ValueMap(
        {v: model.ValueMappingResult(text=v, color=c, index=i) for i, (v, c) in enumerate(colours.items())}
    )
    return [
        model.DynamicConfigValue("mappings", [mapping]),
        model.DynamicConfigValue("custom.cellOptions", {"type": "color-text"}),
    ]
