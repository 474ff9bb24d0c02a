"""Integration tests that need Mosquitto itself, not just an MQTT broker.

On a machine without Mosquitto (or with ``PILOTLAB_STACK_MQTT=amqtt``) the embedded stack runs
amqtt (docs/operations.md, "Nothing but Python"), which keeps nothing across its own restart,
has no shared subscriptions (``$share``) and is slower. The tests below measure exactly those
things of Mosquitto; they skip there and say why, so ``make test`` passes on a machine with
only Python. Everything else runs on whichever broker the machine gives, and
tests/integration/test_fallback.py runs the end-to-end and credential tests on amqtt always.

A test can say it with ``@pytest.mark.needs_mosquitto("why")``; ``NEEDS_MOSQUITTO`` names the
ones that do not carry the mark (yet), by their node id within tests/integration.
"""

from __future__ import annotations

import pytest

from control.stack import StackError, choose_mqtt, wanted_parts

RESTART = "amqtt keeps no session or queued message across its own restart"
NEEDS_MOSQUITTO = {
    "test_faults.py::test_kill_minus_nine_mid_stream[mqtt]": RESTART,
    "test_faults.py::test_mqtt_killed_while_ingest_is_away_loses_at_most_the_autosave_window": RESTART,
    "test_ingest_replicas.py::": "amqtt has no shared subscriptions ($share): one ingest replica",
    "test_bench_e2e.py::": "the benchmark measures the Mosquitto pipeline (its process, its rates)",
}


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers", "needs_mosquitto(reason): skipped when the embedded stack runs amqtt instead of Mosquitto"
    )


def _stack_broker() -> str | None:
    (wanted, source), _ = wanted_parts()
    try:
        return choose_mqtt(wanted, source).kind
    except StackError:
        return None  # no broker at all: `stack up` says so in every test


def pytest_collection_modifyitems(config, items) -> None:
    broker = _stack_broker()
    if broker in ("mosquitto", None):
        return
    for item in items:
        name = item.nodeid.rsplit("/", 1)[-1]
        marker = item.get_closest_marker("needs_mosquitto")
        reason = (marker.args[0] if marker and marker.args else None) or next(
            (why for key, why in NEEDS_MOSQUITTO.items() if name.startswith(key)), None
        )
        if marker or reason:
            item.add_marker(pytest.mark.skip(reason=f"needs Mosquitto; this machine's stack runs {broker}: {reason}"))
