"""Shared fixtures. Each integration test module gets its own real embedded stack (Mosquitto,
tansu, PostgreSQL on loopback ports in a temporary directory), started with the same code as
``pilotlab stack up`` and stopped at the end of the module, whatever happens. A stack starts
in about two seconds; one per module keeps consumer groups, shared subscriptions and broker
state of one module from leaking into the next."""

from __future__ import annotations

from pathlib import Path

import pytest

from control.stack import Stack, StackState
from pilotlab.kafka_admin import ensure_topics
from storage.migrate import migrate

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stack_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pilotlab-stack")


@pytest.fixture(scope="module")
def stack(stack_dir: Path):
    s = Stack(stack_dir)
    try:
        state = s.up()
        migrate(state.database_url)
        ensure_topics(state.kafka_bootstrap, partitions=4)
        yield s
    finally:
        s.down(purge=True)


@pytest.fixture(scope="module")
def stack_state(stack: Stack) -> StackState:
    state = stack.load()
    assert state is not None
    return state
