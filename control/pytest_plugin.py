"""pilotlab's pytest plugin: test your integration against the real pipeline.

Installed with pilotlab (entry point ``pytest11: pilotlab``); its fixtures do nothing until
a test asks for them:

* ``pilotlab_stack`` (session): the embedded stack (Mosquitto, Kafka/tansu, PostgreSQL),
  schema applied and topics created; started once per session, stopped at the end. With
  ``--pilotlab-stack-dir DIR`` a stack already running there (``pilotlab stack up``) is
  reused and left running.
* ``pilotlab_pipeline`` (session): ingest, streams and sink running against it.
* ``pilotlab`` (per test): a :class:`Harness` to apply manifests, run a scenario or replay a
  recording, and wait, with a timeout, until readings or KPIs appear.

Example::

    def test_our_sensors_reach_the_dashboard(pilotlab):
        truth = pilotlab.run_scenario("tests/scenarios/our-sensors.yaml", speed=5000)
        pilotlab.wait_for_truth(truth)
        assert pilotlab.readings("our-pilot") == truth.stored_for("our-pilot")
        pilotlab.wait_for_kpis("our-pilot", "energy_mean")
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest

from pilotlab.contracts import KafkaTopics, Limits, to_ms
from pilotlab.manifest import Experiment, load_manifests, parse_duration

__all__ = ["Harness", "PilotlabTimeout"]

# pytest loads this plugin in every session where pilotlab is installed, a startup's too: the
# stack, the services and the simulators (their imports add some 0.3 s, and storage.sink registers
# its Prometheus metrics on import) are imported by the fixtures and methods that use them


class PilotlabTimeout(AssertionError):
    """What was awaited did not appear in time (an assertion failure, with what was seen)."""


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pilotlab")
    group.addoption(
        "--pilotlab-stack-dir",
        default=None,
        help="use (and leave running) the embedded stack in this directory; default: a fresh one per session",
    )
    group.addoption(
        "--pilotlab-max-age",
        default="30d",
        help="ingest's accepted timestamp age for the pipeline fixture (PILOTLAB_INGEST_MAX_AGE_S), e.g. 30d",
    )


@pytest.fixture(scope="session")
def pilotlab_stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """The embedded stack's :class:`control.stack.StackState` (schema and topics ready)."""
    from control.stack import Stack  # noqa: PLC0415
    from pilotlab.kafka_admin import ensure_topics  # noqa: PLC0415
    from storage.migrate import migrate  # noqa: PLC0415

    given = request.config.getoption("--pilotlab-stack-dir")
    stack = Stack(Path(given) if given else tmp_path_factory.mktemp("pilotlab-stack"))
    was_up = stack.status()["up"]
    try:
        state = stack.up()
        migrate(state.database_url)
        from confluent_kafka.admin import AdminClient  # noqa: PLC0415

        existing = set(AdminClient({"bootstrap.servers": state.kafka_bootstrap}).list_topics(timeout=15).topics)
        missing = tuple(t for t in KafkaTopics.ALL if t not in existing)
        if missing:  # a reused stack has them already (ensure_topics wants at least one)
            ensure_topics(state.kafka_bootstrap, partitions=4, topics=missing)
        yield state
    finally:
        if not was_up:
            stack.down(purge=not given)  # a throwaway stack in a temporary directory


class Pipeline:
    """The running services, with the stack they run on."""

    def __init__(self, state, services, max_age_s: int) -> None:
        self.state = state
        self.services = services
        self.max_age_s = max_age_s


@pytest.fixture(scope="session")
def pilotlab_pipeline(request: pytest.FixtureRequest, pilotlab_stack, tmp_path_factory):
    """ingest, streams and sink as subprocesses against ``pilotlab_stack``."""
    from control.services import Services  # noqa: PLC0415

    max_age_s = parse_duration(request.config.getoption("--pilotlab-max-age"))
    logs = tmp_path_factory.mktemp("pilotlab-services") / "logs"
    env = {"PILOTLAB_INGEST_MAX_AGE_S": str(max_age_s)}
    with Services(pilotlab_stack, logs, env).start() as services:
        services.wait_ingest_ready()
        yield Pipeline(pilotlab_stack, services, max_age_s)


@pytest.fixture
def pilotlab(pilotlab_pipeline) -> Harness:
    """Apply manifests, run scenarios and replays, and wait for what the pipeline stores."""
    return Harness(pilotlab_pipeline)


class Harness:
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.state = pipeline.state
        self.mqtt_url = pipeline.state.mqtt_url

    # --- setting up ------------------------------------------------------------------------

    def apply(
        self, manifests: Path | str | Experiment | Iterable[Experiment], timeout: float = 60.0
    ) -> list[Experiment]:
        """Register manifests (a file, a directory, or Experiment objects) and wait until the
        pipeline has read them (the sink has stored them)."""
        from pilotlab import registry  # noqa: PLC0415

        if isinstance(manifests, (str, Path)):
            experiments = load_manifests(Path(manifests))
        elif isinstance(manifests, Experiment):
            experiments = [manifests]
        else:
            experiments = list(manifests)
        registry.publish(self.state.kafka_bootstrap, experiments)
        want = {e.id: e.periods.intervention.end for e in experiments}

        def registered() -> tuple[bool, str]:
            with psycopg.connect(self.state.database_url) as conn:
                rows = dict(
                    conn.execute(
                        "SELECT experiment_id, intervention_end FROM experiments WHERE experiment_id = ANY(%s)",
                        (list(want),),
                    ).fetchall()
                )
            return rows == want, f"registered so far: {sorted(rows)}"

        self._wait(registered, timeout, f"manifests {sorted(want)} registered")
        return experiments

    def run_scenario(self, scenario, *, speed: float | None = None, out_dir: Path | None = None):
        """Publish a scenario (a path or a loaded :class:`simulators.spec.Scenario`) after
        registering its experiments; returns its :class:`simulators.faults.GroundTruth`.
        The truth is judged with this pipeline's ingest limits."""
        from simulators.runner import run_scenario  # noqa: PLC0415
        from simulators.spec import load_scenario  # noqa: PLC0415

        if isinstance(scenario, (str, Path)):
            scenario = load_scenario(Path(scenario))
        limits = Limits(
            max_age_ms=self.pipeline.max_age_s * 1000, max_future_ms=scenario.ingest.max_future * 1000
        )
        if scenario.ingest.max_future != 300:
            raise ValueError("the pipeline fixture's ingest allows 300 s ahead; set ingest.max_future: 300s")
        truth, _stats = run_scenario(
            scenario, self.mqtt_url, speed=speed, limits=limits, before_start=self.apply, out_dir=out_dir
        )
        return truth

    def replay(self, path: Path | str, *, speed: float = 1.0, time_shift: timedelta | str | None = "auto"):
        """Publish a recording (``pilotlab record`` or ``simulate --out``); returns its stats."""
        from simulators.replay import replay  # noqa: PLC0415

        return replay(self.mqtt_url, Path(path), speed=speed, time_shift=time_shift)

    # --- reading back -------------------------------------------------------------------------

    def readings(self, experiment_id: str) -> dict[tuple[str, str, int], float]:
        """Stored readings: (device, metric, ts in epoch ms) → value."""
        with psycopg.connect(self.state.database_url) as conn:
            rows = conn.execute(
                "SELECT device_id, metric, ts, value FROM readings WHERE experiment_id = %s", (experiment_id,)
            ).fetchall()
        return {(d, m, to_ms(ts)): v for d, m, ts, v in rows}

    def rejections(self, experiment_id: str) -> Counter:
        """Stored rejections of an experiment by reason code."""
        with psycopg.connect(self.state.database_url) as conn:
            rows = conn.execute(
                "SELECT reason, count(*) FROM rejections WHERE experiment_id = %s GROUP BY reason", (experiment_id,)
            ).fetchall()
        return Counter(dict(rows))

    def kpis(self, experiment_id: str, kpi: str | None = None) -> list[dict]:
        with psycopg.connect(self.state.database_url) as conn:
            cur = conn.execute(
                "SELECT kpi, device_group, window_start, window_size_s, value, sample_count FROM kpi_values"
                " WHERE experiment_id = %s AND (%s::text IS NULL OR kpi = %s) ORDER BY kpi, device_group, window_start",
                (experiment_id, kpi, kpi),
            )
            names = [c.name for c in cur.description]
            return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

    # --- waiting ---------------------------------------------------------------------------------

    def _wait(self, check, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.pipeline.services.check_alive()
            done, seen = check()
            if done:
                return
            if time.monotonic() > deadline:
                raise PilotlabTimeout(f"{what}: not within {timeout:.0f} s; {seen}")
            time.sleep(0.5)

    def wait_for_readings(self, experiment_id: str, count: int, timeout: float = 120.0) -> None:
        """Until at least ``count`` readings (datapoints) of the experiment are stored."""

        def check():
            with psycopg.connect(self.state.database_url) as conn:
                sql = "SELECT count(*) FROM readings WHERE experiment_id = %s"
                n = conn.execute(sql, (experiment_id,)).fetchone()[0]
            return n >= count, f"{n} of {count} readings stored"

        self._wait(check, timeout, f"{experiment_id}: {count} readings")

    def wait_for_kpis(self, experiment_id: str, kpi: str | None = None, timeout: float = 120.0, min_windows: int = 1):
        """Until at least ``min_windows`` KPI windows (of ``kpi``, or any) are stored; returns them."""

        def check():
            rows = self.kpis(experiment_id, kpi)
            return len(rows) >= min_windows, f"{len(rows)} KPI windows stored"

        self._wait(check, timeout, f"{experiment_id}: KPI {kpi or '(any)'}")
        return self.kpis(experiment_id, kpi)

    def wait_for_truth(self, truth, timeout: float = 180.0) -> None:
        """Until every datapoint the ground truth says should be stored is stored, every
        expected rejection is recorded, and the services have no backlog."""
        from pilotlab.kafka_admin import lag_or_reason  # noqa: PLC0415
        from storage.sink import TOPICS as SINK_TOPICS  # noqa: PLC0415

        keys = list(truth.stored)
        devices = [k[0] for k in keys]
        metrics = [k[1] for k in keys]
        stamps = [k[2] for k in keys]
        rejection_ids = list(truth.rejected)

        def check():
            with psycopg.connect(self.state.database_url) as conn:
                stored = conn.execute(
                    "SELECT count(*) FROM readings r JOIN unnest(%s::text[], %s::text[], %s::bigint[]) AS k(d, m, t)"
                    " ON r.device_id = k.d AND r.metric = k.m"
                    " AND r.ts = 'epoch'::timestamptz + k.t * interval '1 millisecond'",
                    (devices, metrics, stamps),
                ).fetchone()[0]
                rejected = conn.execute(
                    "SELECT count(*) FROM rejections WHERE rejection_id = ANY(%s)", (rejection_ids,)
                ).fetchone()[0]
            seen = f"readings {stored}/{len(keys)}, rejections {rejected}/{len(rejection_ids)}"
            if stored < len(keys) or rejected < len(rejection_ids):
                return False, seen
            lags = (
                lag_or_reason(self.state.kafka_bootstrap, "pilotlab-sink", SINK_TOPICS),
                lag_or_reason(self.state.kafka_bootstrap, "pilotlab-streams", (KafkaTopics.READINGS,)),
            )
            return lags == (0, 0), f"{seen}, consumer lag (sink, streams) {lags}"

        self._wait(check, timeout, f"ground truth of {truth.scenario!r} stored")
