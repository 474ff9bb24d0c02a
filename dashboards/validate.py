"""Whether a dashboard JSON model is valid for the Grafana docker-compose runs, checked without
Grafana: against Grafana's own schema, and against the rules that schema cannot express.

**The schema** is ``dashboards/schema/grafana-dashboard.schema.json``: JSON Schema generated from
the TypeScript types of the npm package ``@grafana/schema`` (the version of the Grafana image;
``make -C dashboards/schema`` regenerates it, see that Makefile). Every built dashboard is validated
against its ``Dashboard`` definition, each panel's ``options`` against its plugin's
``PanelOptions_<type>``, ``fieldConfig.defaults.custom`` against ``PanelFieldConfig_<type>`` and
each field override property against the field config it names. Objects are closed, as the
TypeScript interfaces are: a field Grafana's schema does not have is a finding.

Two places where Grafana accepts more than the TypeScript types say, handled here:

- panel options and custom field config are checked *without* their required properties: Grafana
  merges the plugin's defaults into what a dashboard stores (``{}`` is a complete ``options``), so
  the types' required fields describe the merged options, not the stored ones;
- an interval variable's ``auto``, ``auto_min``, ``auto_count``: Grafana reads them
  (``IntervalVariableModel`` in @grafana/data) although ``VariableModel`` lacks them; they are
  checked by :func:`rule_findings` and left out of the schema validation.

**The rules** (:func:`rule_findings`) cover what the types are too loose to say: ``options`` is an
object (never ``null``); no top-level ``style`` (removed from the schema in Grafana 10.2,
grafana/grafana#73879); no variable ``id`` (a runtime key of Grafana's variable store: two
variables stored with the same id share one slot) and ``auto``/``auto_min``/``auto_count`` only on
interval variables (grafana-foundation-sdk writes them on every variable); unique variable names;
the ``schemaVersion`` of this Grafana (older ones are migrated on every load); a valid ``uid``;
unique panel ids; grid positions inside the 24 columns without overlap (the CUE source's bounds
are lost in the TypeScript types); every datasource referred to by ``uid`` (not by name), one that
is provisioned; every query with a unique ``refId``, and PostgreSQL queries with their raw SQL
and a format.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections import defaultdict
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

SCHEMA_FILE = Path(__file__).resolve().parent / "schema" / "grafana-dashboard.schema.json"

# datasource uids Grafana itself provides, besides the provisioned ones
BUILTIN_DATASOURCE_UIDS = frozenset({"grafana", "-- Grafana --", "-- Mixed --", "-- Dashboard --"})
INTERVAL_ONLY_FIELDS = ("auto", "auto_min", "auto_count")
SQL_DATASOURCE_TYPES = frozenset({"grafana-postgresql-datasource", "postgres"})
SQL_FORMATS = frozenset({"table", "time_series"})
GRID_COLUMNS = 24
UID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,40}$")  # Grafana refuses longer uids and other characters


@dataclass(frozen=True, order=True)
class Finding:
    """One reason Grafana would not take a dashboard as it is. ``path`` is where in the model
    (``panels[3].options``), ``check`` is ``schema`` or the name of the rule."""

    path: str
    message: str
    check: str

    def __str__(self) -> str:
        return f"{self.path or '(dashboard)'}: {self.message} [{self.check}]"


@functools.cache
def schema() -> dict:
    return json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))


def grafana_version() -> str:
    """The Grafana version the schema was generated for (``@grafana/schema``'s)."""
    return schema()["x-grafana"]["version"]


def schema_version() -> int:
    """The dashboard ``schemaVersion`` that Grafana writes, and loads without migrating."""
    return schema()["x-grafana"]["schemaVersion"]


def findings(model: dict, datasource_uids: Collection[str] | None = None) -> list[Finding]:
    """Every finding of a dashboard model: schema first, then rules (empty list: valid).
    ``datasource_uids``: the provisioned datasources' uids (None: any uid is accepted)."""
    return sorted(set(schema_findings(model))) + sorted(set(rule_findings(model, datasource_uids)))


def problems(model: dict, datasource_uids: Collection[str] | None = None) -> list[str]:
    """:func:`findings` as lines, with the panel's title after its index."""
    return [_label(model, str(f)) for f in findings(model, datasource_uids)]


# --------------------------------------------------------------------------------------- schema


def schema_findings(model: dict) -> Iterator[Finding]:
    yield from _validate("Dashboard", _schema_view(model), "")
    for where, panel in _panels(model):
        yield from _panel_schema_findings(panel, where)


def _schema_view(model: dict) -> dict:
    """The model as the schema is asked about it: without an interval variable's
    auto/auto_min/auto_count, which Grafana reads but ``VariableModel`` does not declare."""
    if not any(_is_interval(v) for _, v in _variables(model)):
        return model
    view = copy.deepcopy(model)
    for _, var in _variables(view):
        if _is_interval(var):
            for k in INTERVAL_ONLY_FIELDS:
                var.pop(k, None)
    return view


def _panel_schema_findings(panel: dict, where: str) -> Iterator[Finding]:
    ptype = panel.get("type")
    if ptype == "row" or not isinstance(ptype, str):
        return  # a row has no options; a missing or non-string type is a Dashboard schema finding
    defs = schema()["definitions"]
    name = ptype.replace("-", "_")
    options_def, custom_def = f"PanelOptions_{name}", f"PanelFieldConfig_{name}"
    if options_def not in defs:
        yield Finding(f"{where}.type", f"unknown panel type {ptype!r}: not a core panel of Grafana {grafana_version()} "
                      "(or add its types to dashboards/schema/grafana-types.ts)", "schema")
        return
    if isinstance(panel.get("options"), dict):
        yield from _validate(options_def, panel["options"], f"{where}.options", partial=True)
    field_config = panel.get("fieldConfig") if isinstance(panel.get("fieldConfig"), dict) else {}
    defaults = field_config.get("defaults") if isinstance(field_config.get("defaults"), dict) else {}
    custom = defaults.get("custom")
    if isinstance(custom, dict) and custom:
        if custom_def in defs:
            yield from _validate(custom_def, custom, f"{where}.fieldConfig.defaults.custom", partial=True)
        else:
            yield Finding(f"{where}.fieldConfig.defaults.custom", f"a {ptype} panel has no custom field config",
                          "schema")
    overrides = field_config.get("overrides")
    for i, override in enumerate(overrides if isinstance(overrides, list) else []):
        props = override.get("properties") if isinstance(override, dict) else None
        for j, prop in enumerate(props if isinstance(props, list) else []):
            if isinstance(prop, dict) and isinstance(prop.get("id"), str):
                yield from _override_findings(ptype, custom_def, prop, f"{where}.fieldConfig.overrides[{i}]"
                                              f".properties[{j}]")


def _override_findings(ptype: str, custom_def: str, prop: dict, where: str) -> Iterator[Finding]:
    """An override property ``id`` names a field config property (``decimals``) or a custom one
    (``custom.cellOptions``); its ``value`` must be what that property takes."""
    defs = schema()["definitions"]
    pid = prop["id"]
    if pid.startswith("custom."):
        key, target = pid.removeprefix("custom."), defs.get(custom_def, {})
        known = f"the custom field config of a {ptype} panel"
    else:
        key, target, known = pid, defs["FieldConfig"], "the field config"
    sub = target.get("properties", {}).get(key)
    if sub is None:
        yield Finding(f"{where}.id", f"{pid!r} is not a property of {known}", "schema")
    elif "value" in prop:
        yield from _validate_schema(sub, prop["value"], f"{where}.value", partial=True)


@functools.cache
def _validator(definition: str, partial: bool):
    return _make_validator(schema()["definitions"][definition], partial)


def _make_validator(subschema: dict, partial: bool):
    from jsonschema import Draft7Validator  # noqa: PLC0415  (a test dependency: only the checks need it)

    return Draft7Validator(_without_required(subschema) if partial else subschema)


def _without_required(node):
    if isinstance(node, dict):
        return {k: _without_required(v) for k, v in node.items() if k != "required"}
    if isinstance(node, list):
        return [_without_required(v) for v in node]
    return node


def _validate(definition: str, instance: object, base: str, partial: bool = False) -> Iterator[Finding]:
    for error in _validator(definition, partial).iter_errors(instance):
        yield from _leaves(error, base)


def _validate_schema(subschema: dict, instance: object, base: str, partial: bool) -> Iterator[Finding]:
    for error in _make_validator(subschema, partial).iter_errors(instance):
        yield from _leaves(error, base)


def _leaves(error, base: str) -> Iterator[Finding]:
    """The errors worth reading: for an anyOf/oneOf (a panel is a Panel or a RowPanel, a
    datasource an object or null...), those of the branch the value was meant for."""
    if error.validator in ("anyOf", "oneOf") and error.context:
        branches: dict[int, list] = defaultdict(list)
        for sub in error.context:
            branches[sub.relative_schema_path[0]].append(sub)

        def miss(item: tuple[int, list]) -> tuple[bool, int, int]:
            index, errors = item
            # a branch for another kind: the value's own type is wrong, or a discriminator (const)
            wrong = any((e.validator == "type" and not e.relative_path) or e.validator == "const" for e in errors)
            # a branch whose discriminator the value has (a RowPanel for "type": "row") is the one meant
            branch = error.validator_value[index] if isinstance(error.validator_value[index], dict) else {}
            consts = sum(1 for k, p in branch.get("properties", {}).items() if isinstance(p, dict) and "const" in p
                         and isinstance(error.instance, dict) and error.instance.get(k) == p["const"])
            size = sum(len(_unexpected(e)) or 1 for e in errors)
            return wrong, -consts, size

        best_index, best = min(branches.items(), key=miss)
        if not miss((best_index, best))[0]:
            for sub in best:
                yield from _leaves(sub, base)
            return
        expected = sorted({str(s.get("type", "?")) for s in error.validator_value if isinstance(s, dict)})
        yield Finding(_path(base, error.absolute_path), f"{_short(error.instance)} is none of: {', '.join(expected)}",
                      "schema")
        return
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        for key in _unexpected(error):
            yield Finding(_path(base, [*error.absolute_path, key]),
                          f"{key!r} is not in Grafana {grafana_version()}'s schema", "schema")
        return
    yield Finding(_path(base, error.absolute_path), _short_message(error), "schema")


def _unexpected(error) -> list[str]:
    """The keys an additionalProperties error is about (none for other errors)."""
    if error.validator != "additionalProperties" or not isinstance(error.instance, dict):
        return []
    declared = set(error.schema.get("properties", {}))
    return sorted(k for k in error.instance if k not in declared)


def _short_message(error) -> str:
    if error.validator == "type":
        return f"{_short(error.instance)} is not of type {error.validator_value}"
    if error.validator == "enum":
        return f"{_short(error.instance)} is not one of {error.validator_value}"
    return error.message if len(error.message) <= 200 else error.message[:197] + "..."


def _short(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _path(base: str, parts: Iterable) -> str:
    out = base
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


# ---------------------------------------------------------------------------------------- rules


def rule_findings(model: dict, datasource_uids: Collection[str] | None = None) -> Iterator[Finding]:
    yield from _dashboard_rules(model)
    variables = _variables(model)
    yield from _variable_rules(variables)
    datasource_variables = {v.get("name") for _, v in variables if v.get("type") == "datasource"}
    known = None if datasource_uids is None else frozenset(datasource_uids) | BUILTIN_DATASOURCE_UIDS
    for where, var in variables:
        if "datasource" in var and var.get("type") in ("query", "adhoc", "groupby"):
            yield from _datasource_rule(var["datasource"], f"{where}.datasource", known, datasource_variables)
    for where, panel in _panels(model):
        yield from _panel_rules(panel, where, known, datasource_variables)
    yield from _grid_rules(model)


def _dashboard_rules(model: dict) -> Iterator[Finding]:
    if "style" in model:
        yield Finding("style", "the dashboard theme 'style' was removed from Grafana's dashboard schema in 10.2 "
                      "(grafana/grafana#73879)", "no-style")
    if model.get("schemaVersion") != schema_version():
        yield Finding("schemaVersion", f"{model.get('schemaVersion')!r}: Grafana {grafana_version()} writes "
                      f"{schema_version()}, and migrates any older model on every load", "schema-version")
    uid = model.get("uid")
    if not isinstance(uid, str) or not UID_PATTERN.match(uid):
        yield Finding("uid", f"{uid!r}: a stable uid of 1 to 40 letters, digits, '-' or '_'", "uid")
    if not (isinstance(model.get("title"), str) and model["title"].strip()):
        yield Finding("title", "no title", "uid")


def _variable_rules(variables: list[tuple[str, dict]]) -> Iterator[Finding]:
    seen: set[str] = set()
    for where, var in variables:
        if "id" in var:
            yield Finding(f"{where}.id", "a variable's id is the key of Grafana's variable store at run time, "
                          "not part of the saved model (variables stored with the same id share one slot)",
                          "variable-fields")
        if _is_interval(var):
            for key, kind in (("auto", bool), ("auto_min", str), ("auto_count", int)):
                if key in var and not (isinstance(var[key], kind) and not (kind is int and isinstance(var[key], bool))):
                    yield Finding(f"{where}.{key}", f"{_short(var[key])} is not a {kind.__name__}", "variable-fields")
        else:
            for key in INTERVAL_ONLY_FIELDS:
                if key in var:
                    yield Finding(f"{where}.{key}", f"only an interval variable has {key!r} "
                                  f"(this one is a {var.get('type')!r} variable)", "variable-fields")
        name = var.get("name")
        if name in seen:
            yield Finding(f"{where}.name", f"a second variable named {name!r}", "variable-fields")
        seen.add(name)


def _panel_rules(panel: dict, where: str, known: frozenset[str] | None,
                 datasource_variables: set) -> Iterator[Finding]:
    if panel.get("type") == "row":
        return
    if "options" in panel and not isinstance(panel["options"], dict):
        yield Finding(f"{where}.options", f"{_short(panel['options'])}: a panel's options are an object "
                      "({} lets Grafana apply the panel's defaults)", "panel-options")
    targets = panel.get("targets") if isinstance(panel.get("targets"), list) else []
    if targets:
        if "datasource" not in panel:
            yield Finding(f"{where}.datasource", "a panel with queries and no datasource (Grafana would pick the "
                          "default one)", "datasource-uid")
        else:
            yield from _datasource_rule(panel["datasource"], f"{where}.datasource", known, datasource_variables)
    ref_ids: set[str] = set()
    for i, target in enumerate(targets):
        at = f"{where}.targets[{i}]"
        if not isinstance(target, dict):
            continue  # a schema finding
        ref = target.get("refId")
        if not (isinstance(ref, str) and ref):
            yield Finding(f"{at}.refId", "a query without a refId", "targets")
        elif ref in ref_ids:
            yield Finding(f"{at}.refId", f"a second query with refId {ref!r}", "targets")
        ref_ids.add(ref)
        ds = target.get("datasource", panel.get("datasource"))
        if "datasource" in target:
            yield from _datasource_rule(target["datasource"], f"{at}.datasource", known, datasource_variables)
        if isinstance(ds, dict) and ds.get("type") in SQL_DATASOURCE_TYPES:
            yield from _sql_target_rules(target, at)


def _sql_target_rules(target: dict, at: str) -> Iterator[Finding]:
    if not (isinstance(target.get("rawSql"), str) and target["rawSql"].strip()):
        yield Finding(f"{at}.rawSql", "a PostgreSQL query without SQL", "targets")
    if target.get("rawQuery") is not True:
        yield Finding(f"{at}.rawQuery", "a raw SQL query needs rawQuery: true", "targets")
    if target.get("format") not in SQL_FORMATS:
        yield Finding(f"{at}.format", f"{_short(target.get('format'))} is not one of {sorted(SQL_FORMATS)}", "targets")
    if target.get("editorMode") not in ("code", "builder"):
        yield Finding(f"{at}.editorMode", f"{_short(target.get('editorMode'))} is not 'code' or 'builder'", "targets")


def _datasource_rule(ref: object, at: str, known: frozenset[str] | None,
                     datasource_variables: set) -> Iterator[Finding]:
    if isinstance(ref, str):
        yield Finding(at, f"datasource {ref!r} referred to by name: refer to it by uid "
                      '({"type": ..., "uid": ...})', "datasource-uid")
        return
    if not isinstance(ref, dict) or not (isinstance(ref.get("uid"), str) and ref["uid"].strip()):
        yield Finding(at, f"{_short(ref)}: a datasource reference needs its uid", "datasource-uid")
        return
    uid = ref["uid"]
    if uid.startswith("$"):
        if uid.strip("${}") not in datasource_variables:
            yield Finding(f"{at}.uid", f"{uid!r} names no datasource variable", "datasource-uid")
    elif known is not None and uid not in known:
        yield Finding(f"{at}.uid", f"no provisioned datasource has uid {uid!r} (known: {sorted(known)})",
                      "datasource-uid")


def _grid_rules(model: dict) -> Iterator[Finding]:
    ids: dict[object, str] = {}
    placed: list[tuple[str, int, int, int, int]] = []
    for where, panel in _panels(model):
        pid = panel.get("id")
        if not (isinstance(pid, int) and not isinstance(pid, bool) and pid > 0):
            yield Finding(f"{where}.id", f"{_short(pid)}: a panel needs a positive integer id", "grid")
        elif pid in ids:
            yield Finding(f"{where}.id", f"id {pid} is also {ids[pid]}'s", "grid")
        else:
            ids[pid] = where
        pos = panel.get("gridPos")
        if not isinstance(pos, dict):
            yield Finding(f"{where}.gridPos", "no grid position", "grid")
            continue
        values = {k: pos.get(k) for k in ("x", "y", "w", "h")}
        bad = [k for k, v in values.items() if not (isinstance(v, int) and not isinstance(v, bool))]
        if bad:
            yield Finding(f"{where}.gridPos", f"{', '.join(bad)} not an integer", "grid")
            continue
        x, y, w, h = values["x"], values["y"], values["w"], values["h"]
        if not (w >= 1 and h >= 1 and x >= 0 and y >= 0 and x + w <= GRID_COLUMNS):
            yield Finding(f"{where}.gridPos", f"x={x} w={w} y={y} h={h}: outside the {GRID_COLUMNS} columns "
                          "(w >= 1, h >= 1, x >= 0, y >= 0, x + w <= 24)", "grid")
            continue
        if where.count("panels[") == 1:  # panels of a collapsed row have their own layout
            for other, ox, oy, ow, oh in placed:
                if x < ox + ow and ox < x + w and y < oy + oh and oy < y + h:
                    yield Finding(f"{where}.gridPos", f"overlaps {other}", "grid")
            placed.append((where, x, y, w, h))


# -------------------------------------------------------------------------------------- walking


def _panels(model: dict) -> Iterator[tuple[str, dict]]:
    """Every panel, with the panels of collapsed rows."""
    panels = model.get("panels")
    for i, panel in enumerate(panels if isinstance(panels, list) else []):
        if not isinstance(panel, dict):
            continue
        yield f"panels[{i}]", panel
        nested = panel.get("panels") if panel.get("type") == "row" else None
        for j, inner in enumerate(nested if isinstance(nested, list) else []):
            if isinstance(inner, dict):
                yield f"panels[{i}].panels[{j}]", inner


def _variables(model: dict) -> list[tuple[str, dict]]:
    templating = model.get("templating")
    variables = templating.get("list") if isinstance(templating, dict) else None
    return [(f"templating.list[{i}]", v) for i, v in enumerate(variables if isinstance(variables, list) else [])
            if isinstance(v, dict)]


def _is_interval(var: object) -> bool:
    return isinstance(var, dict) and var.get("type") == "interval"


def _label(model: dict, line: str) -> str:
    """``panels[3].options: ...`` → ``panels[3] ('Title').options: ...``"""
    m = re.match(r"^panels\[(\d+)\]", line)
    panels = model.get("panels") if isinstance(model.get("panels"), list) else []
    if m and int(m.group(1)) < len(panels) and isinstance(panels[int(m.group(1))], dict):
        title = panels[int(m.group(1))].get("title")
        if title:
            return f"{m.group(0)} ({title!r}){line[m.end():]}"
    return line
