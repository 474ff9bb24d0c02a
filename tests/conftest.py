"""Shared fixtures. Integration tests get one real embedded stack per test session (Mosquitto,
tansu, PostgreSQL on loopback ports in a temporary directory), started with the same code as
``pilotlab stack up`` and stopped at the end, whatever happens."""

from __future__ import annotations

from pathlib import Path

import pytest

from pilotlab.kafka_admin import ensure_topics
from pilotlab.stack import Stack, StackState
from storage.migrate import migrate

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def stack_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pilotlab-stack")


@pytest.fixture(scope="session")
def stack(stack_dir: Path):
    s = Stack(stack_dir)
    try:
        state = s.up()
        migrate(state.database_url)
        ensure_topics(state.kafka_bootstrap, partitions=4)
        yield s
    finally:
        s.down()


@pytest.fixture(scope="session")
def stack_state(stack: Stack) -> StackState:
    state = stack.load()
    assert state is not None
    return state
