"""SQL pieces of the Grafana impact panels: an impact as people read it, from the ``details``
JSON the streams worker stores (:meth:`streams.impact.ImpactResult.as_dict`).

The estimate is formatted by its scale — a relative change in % (``-29.1%``), or a difference
in the metric's unit (``+1.02 degC``), never an absolute difference multiplied by 100 — and
the warning codes are joined to the sentences of :data:`pilotlab.contracts.IMPACT_WARNINGS`, written into
the SQL when the dashboards are built, so that the panels and the report say the same.
"""

from __future__ import annotations

from grafana_foundation_sdk.models import dashboard as model

from dashboards.impact_text import GRAFANA_VERDICT_COLOURS, VERDICT_SYMBOLS, VERDICTS
from pilotlab.contracts import IMPACT_WARNINGS as WARNINGS


def _lit(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def number(field: str, d: str = "details") -> str:
    """``details->>field`` in its display scale: × 100 (percent) when relative, as is (the
    metric's unit) when absolute."""
    v = f"({d}->>'{field}')::float8"
    return f"CASE WHEN {d}->>'scale' = 'absolute' THEN {v} ELSE 100 * {v} END"


def unit(d: str = "details") -> str:
    """The unit of :func:`number`: ``%`` or the metric's unit."""
    return f"CASE WHEN {d}->>'scale' = 'absolute' THEN coalesce({d}->>'unit', '') ELSE '%' END"


def effect(field: str, d: str = "details", with_unit: bool = True, obj: str | None = None) -> str:
    """``details->>field`` as text in its scale: ``-29.1%``, ``+1.02 degC`` (NULL when null).
    ``obj``: the JSON object holding the field when it is not ``details`` itself (the placebo);
    the scale and unit are always ``details``'."""
    o = obj or d
    v = f"({o}->>'{field}')::float8"
    unit_txt = f" || coalesce(' ' || ({d}->>'unit'), '')" if with_unit else ""
    return (
        f"CASE WHEN {o}->>'{field}' IS NULL THEN NULL"
        f" WHEN {d}->>'scale' = 'absolute' THEN {_signed(v, 2)}{unit_txt}"
        f" ELSE {_signed(f'100 * {v}', 1)} || '%' END"
    )


def _signed(v: str, digits: int) -> str:
    """``v`` with its sign and ``digits`` decimals (``+1.02``, ``-29.1``), zero unsigned (``0.0``)."""
    zero = "0." + "0" * digits
    fmt = "FMSG999999990." + "0" * digits
    return f"(CASE WHEN round(({v})::numeric, {digits}) = 0 THEN '{zero}' ELSE to_char({v}, '{fmt}') END)"


def interval(d: str = "details", obj: str | None = None) -> str:
    """The 95% interval as text, ``-33.0% … -25.0%`` (NULL without an interval)."""
    return f"{effect('ci_low', d, with_unit=False, obj=obj)} || ' … ' || {effect('ci_high', d, obj=obj)}"


def estimate_with_interval(d: str = "details", obj: str | None = None) -> str:
    """``-29.1% [95% CI -33.0% … -25.0%]``; the estimate alone without an interval, ``—``
    before any estimate (or without a placebo check, for ``obj`` = the placebo)."""
    return (
        f"coalesce({effect('estimate', d, obj=obj)}"
        f" || coalesce(' [95% CI ' || {interval(d, obj)} || ']', ''), '—')"
    )


def placebo(d: str = "details") -> str:
    """The placebo check (the baseline's second half against its first) as text."""
    return estimate_with_interval(d, obj=f"({d}->'placebo')")


def devices(d: str = "details") -> str:
    """``6 vs 6 devices`` (treatment vs control), ``6 devices, no control group``."""
    t, c = f"coalesce({d}->'devices'->>'treatment', '0')", f"coalesce({d}->'devices'->>'control', '0')"
    return (
        f"CASE WHEN {d} IS NULL THEN NULL"
        f" WHEN {d}->>'design' = 'before-after' THEN {t} || ' devices, no control group'"
        f" ELSE {t} || ' vs ' || {c} || ' devices' END"
    )


def warning_sentences_table() -> str:
    """``(VALUES (code, sentence), ...) AS w(code, sentence)``: every warning code's sentence."""
    rows = ",\n        ".join(f"({_lit(code)}, {_lit(text)})" for code, text in WARNINGS.items())
    return f"(VALUES\n        {rows}) AS w(code, sentence)"


def warnings(d: str = "details") -> str:
    """The warnings as sentences joined by ``; `` (NULL when there is none)."""
    return (
        "(SELECT string_agg(coalesce(w.sentence, c.code), '; ' ORDER BY c.n)\n"
        f"       FROM jsonb_array_elements_text({d}->'warnings') WITH ORDINALITY AS c(code, n)\n"
        f"       LEFT JOIN {warning_sentences_table()} ON w.code = c.code)"
    )


def verdict_mappings() -> list[model.ValueMap]:
    """Each verdict in its colour, with a symbol so that it does not rest on colour alone."""
    return [
        model.ValueMap(
            {
                v: model.ValueMappingResult(text=f"{VERDICT_SYMBOLS[v]} {v}", color=GRAFANA_VERDICT_COLOURS[v], index=i)
                for i, v in enumerate(VERDICTS)
            }
        )
    ]


def verdict_column() -> list[model.DynamicConfigValue]:
    """Field overrides for a table's ``verdict`` column: coloured text with its symbol."""
    return [
        model.DynamicConfigValue("mappings", verdict_mappings()),
        model.DynamicConfigValue("custom.cellOptions", {"type": "color-text"}),
    ]


def long_text_column(width: int | None = None) -> list[model.DynamicConfigValue]:
    """Field overrides for a long text column (warnings, method): the cell can be inspected."""
    props = [model.DynamicConfigValue("custom.inspect", True)]
    if width:
        props.append(model.DynamicConfigValue("custom.minWidth", width))
    return props
