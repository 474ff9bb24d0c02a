"""Ingest's limits live in the ground (pilotlab.contracts.Limits): ingest refuses a timestamp
exactly when the rule the simulators judge their ground truth with says so."""

from __future__ import annotations

import orjson
from hypothesis import given
from hypothesis import strategies as st

from ingest.decode import decode
from pilotlab.contracts import Limits, Reason

NOW = 1_780_000_000_000
LIMITS = Limits(max_age_ms=3_600_000, max_future_ms=60_000)


def test_the_window_is_inclusive_at_both_ends() -> None:
    assert LIMITS.ts_verdict(NOW + 60_000, NOW) is None
    assert LIMITS.ts_verdict(NOW + 60_001, NOW) is Reason.TIMESTAMP_IN_FUTURE
    assert LIMITS.ts_verdict(NOW - 3_600_000, NOW) is None
    assert LIMITS.ts_verdict(NOW - 3_600_001, NOW) is Reason.TIMESTAMP_TOO_OLD


@given(st.integers(min_value=NOW - 2 * 3_600_000, max_value=NOW + 2 * 60_000))
def test_ingest_refuses_a_timestamp_exactly_when_the_rule_does(ts_ms: int) -> None:
    decoded = decode(orjson.dumps({"seq": 1, "ts": ts_ms, "metrics": {"pm25": 1.0}}), NOW, LIMITS)
    reasons = [e.reason for e in decoded.errors]
    verdict = LIMITS.ts_verdict(ts_ms, NOW)
    assert reasons == ([] if verdict is None else [verdict])
