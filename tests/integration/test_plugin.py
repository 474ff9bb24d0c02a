"""The pytest plugin as a startup uses it: a tiny external test file, run by pytester in its
own process against the real stack (reused through --pilotlab-stack-dir), applies a scenario,
waits for the ground truth and the KPIs, and compares."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.integration

EXTERNAL_TEST = '''
from collections import Counter

SCENARIO = {
    "name": "startup-check",
    "seed": 3,
    "duration": "2h",
    "speed": 1200,
    "experiments": [{
        "experiment": {
            "id": "plugin-noise", "title": "t", "startup": "S", "district": "D",
            "location": {"lat": 45.07, "lon": 7.68},
            "periods": {"baseline": {"start": "2026-03-01T00:00:00Z", "end": "2026-03-01T01:00:00Z"},
                        "intervention": {"start": "2026-03-01T01:00:00Z", "end": "2026-03-01T02:00:00Z"}},
            "devices": [{"id": "plugin-n1", "kind": "noise", "interval": "1m"},
                        {"id": "plugin-n2", "kind": "noise", "group": "control", "interval": "1m"}],
            "kpis": [{"name": "noise_mean", "metric": "noise", "kind": "mean", "window": "15m"}],
        },
    }],
    "faults": {"duplicates": 0.05, "malformed": 0.05},
}


def test_scenario_reaches_storage(pilotlab):
    from simulators.spec import parse_scenario
    truth = pilotlab.run_scenario(parse_scenario(SCENARIO))
    pilotlab.wait_for_truth(truth)
    assert pilotlab.readings("plugin-noise") == truth.stored_for("plugin-noise")
    assert pilotlab.rejections("plugin-noise") == truth.rejected_by_reason("plugin-noise")
    kpis = pilotlab.wait_for_kpis("plugin-noise", "noise_mean")
    assert {k["device_group"] for k in kpis} == {"treatment", "control"}


def test_a_wrong_expectation_fails(pilotlab):
    import pytest
    from control.pytest_plugin import PilotlabTimeout
    with pytest.raises(PilotlabTimeout, match="0 of 5 readings"):
        pilotlab.wait_for_readings("no-such-experiment", 5, timeout=2)
'''


def test_plugin_fixtures_in_an_external_test_file(pytester, stack, stack_dir):
    pytester.makepyfile(test_startup=EXTERNAL_TEST)
    result = pytester.runpytest_subprocess(
        "--pilotlab-stack-dir", str(stack_dir), "-p", "no:cacheprovider", "-q", timeout=600
    )
    result.assert_outcomes(passed=2)
    assert stack.status()["up"], "a reused stack is left running"
