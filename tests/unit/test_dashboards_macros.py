"""Grafana's PostgreSQL interpolation as documented (datasource macros and template variables)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from dashboards.macros import (
    MacroError,
    TimeRange,
    Variable,
    auto_interval,
    expand_macros,
    go_rfc3339nano,
    interpolate,
    interpolate_variables,
    parse_interval,
)

T0 = datetime(2017, 4, 21, 5, 1, 17, tzinfo=UTC)
T1 = datetime(2017, 4, 21, 5, 6, 17, tzinfo=UTC)
TR = TimeRange(T0, T1)


def test_time_filter_and_bounds_use_rfc3339_in_utc():
    assert expand_macros("WHERE $__timeFilter(ts)", TR) == (
        "WHERE ts BETWEEN '2017-04-21T05:01:17Z' AND '2017-04-21T05:06:17Z'"
    )
    assert expand_macros("$__timeFrom() .. $__timeTo()", TR) == "'2017-04-21T05:01:17Z' .. '2017-04-21T05:06:17Z'"


def test_rfc3339nano_drops_trailing_zero_fractions_and_converts_to_utc():
    cet = datetime(2026, 3, 1, 1, 0, 0, 500000, tzinfo=UTC).astimezone(__import__("zoneinfo").ZoneInfo("Europe/Rome"))
    assert go_rfc3339nano(cet) == "2026-03-01T01:00:00.5Z"
    assert go_rfc3339nano(datetime(2026, 3, 1, tzinfo=UTC)) == "2026-03-01T00:00:00Z"
    with pytest.raises(ValueError):
        go_rfc3339nano(datetime(2026, 3, 1))  # noqa: DTZ001 - naive on purpose


def test_time_group_plain_and_timescaledb():
    assert expand_macros("$__timeGroup(ts,'5m')", TR) == "floor(extract(epoch from ts)/300)*300"
    assert expand_macros("$__timeGroupAlias(ts, '1h', 0)", TR) == 'floor(extract(epoch from ts)/3600)*3600 AS "time"'
    ts = TimeRange(T0, T1, timescaledb=True)
    assert expand_macros("$__timeGroupAlias(ts,'5m')", ts) == "time_bucket('300.000s',ts) AS \"time\""
    assert expand_macros("$__timeGroup(ts, 500ms)", TR) == "floor(extract(epoch from ts)/0.5)*0.5"


def test_other_documented_macros():
    assert expand_macros("$__time(c)", TR) == 'c AS "time"'
    assert expand_macros("$__timeEpoch(c)", TR) == 'extract(epoch from c) as "time"'
    assert expand_macros("$__unixEpochFilter(e)", TR) == "e >= 1492750877 AND e <= 1492751177"
    assert expand_macros("$__unixEpochGroupAlias(e,'1m')", TR) == 'floor((e)/60)*60 AS "time"'


def test_macro_arguments_may_hold_parentheses_and_quoted_commas():
    sql = "$__timeFilter(coalesce(a, b)) AND $__timeGroup(date_trunc('hour', ts), '1h')"
    assert expand_macros(sql, TR) == (
        "coalesce(a, b) BETWEEN '2017-04-21T05:01:17Z' AND '2017-04-21T05:06:17Z' AND "
        "floor(extract(epoch from date_trunc('hour', ts))/3600)*3600"
    )


@pytest.mark.parametrize("sql", ["$__nope(x)", "$__timeGroup(ts)", "$__timeFilter()", "$__timeGroup(ts, 'soon')"])
def test_what_grafana_refuses_is_refused(sql):
    with pytest.raises(MacroError):
        expand_macros(sql, TR)


def test_single_value_variables_are_inserted_with_quotes_doubled():
    vs = {"experiment": Variable("lez'; DROP TABLE readings; --")}
    assert interpolate_variables("WHERE id = '$experiment'", vs) == "WHERE id = 'lez''; DROP TABLE readings; --'"
    assert interpolate_variables("${experiment} [[experiment]]", {"experiment": Variable("a")}) == "a a"


def test_multi_value_variables_become_quoted_lists_and_unknown_ones_stay():
    vs = {"dev": Variable(["a", "b'c"], multi=True)}
    assert interpolate_variables("IN ($dev)", vs) == "IN ('a','b''c')"
    assert interpolate_variables("${dev:csv}", vs) == "a,b'c"
    assert interpolate_variables("$other and $__timeFilter(x)", vs) == "$other and $__timeFilter(x)"


def test_interval_is_range_over_points_rounded_like_grafana():
    assert auto_interval(T0, T0 + timedelta(hours=24), 1000) == timedelta(minutes=1)  # 86.4 s → 1 m
    assert auto_interval(T0, T0 + timedelta(days=30), 1000) == timedelta(minutes=30)  # 2592 s → 30 m
    assert parse_interval("'15m'") == timedelta(minutes=15)
    sql = interpolate("SELECT $__timeGroupAlias(ts, $__interval) WHERE x < $__interval_ms", T0,
                      T0 + timedelta(hours=24))
    assert sql == 'SELECT floor(extract(epoch from ts)/60)*60 AS "time" WHERE x < 60000'
