"""Run the pipeline's services (ingest, streams, sink) as child processes against a stack,
wait until they are ready, and until they have drained. Used by the demo and the tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psycopg

from control.stack import StackState, free_port
from pilotlab.contracts import KafkaTopics
from pilotlab.kafka_admin import lag_or_reason
from storage.sink import TOPICS as SINK_TOPICS

SERVICE_NAMES = ("ingest", "streams", "sink")


def _free_ports(names) -> list[tuple[str, int]]:
    """A distinct free port for each name."""
    ports: list[int] = []
    while len(ports) < len(names):
        if (port := free_port()) not in ports:
            ports.append(port)
    return list(zip(names, ports, strict=True))


class ServiceError(RuntimeError):
    pass


class Services:
    """The three pipeline services as subprocesses; a context manager that always stops them."""

    def __init__(self, state: StackState, log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.state = state
        self.log_dir = log_dir
        self.env = {
            **os.environ,
            **state.env(),
            # each service's /metrics, /healthz and /readyz (pilotlab.health), on a free port
            **{f"PILOTLAB_{name.upper()}_METRICS_PORT": str(port) for name, port in _free_ports(SERVICE_NAMES)},
            "PILOTLAB_STREAMS_DATA_DIR": str(log_dir.parent / "streams"),
            **(env or {}),
        }
        # what the services will use (``env`` may set its own)
        self.ports = {name: int(self.env[f"PILOTLAB_{name.upper()}_METRICS_PORT"]) for name in SERVICE_NAMES}
        self.metrics_port = self.ports["ingest"]
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, *names: str) -> Services:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for name in names or SERVICE_NAMES:
            log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
            try:
                self.procs[name] = subprocess.Popen(
                    [sys.executable, "-m", "control", "run", name],
                    env=self.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            finally:
                log.close()
        return self

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise ServiceError(
                    f"{name} exited with code {proc.returncode}; see {self.log_dir / (name + '.log')}"
                )

    def url(self, name: str, path: str = "/metrics") -> str:
        """A service's /metrics, /healthz or /readyz."""
        return f"http://127.0.0.1:{self.ports[name]}{path}"

    def wait_ready(self, *names: str, timeout: float = 90.0) -> None:
        """Until each service's /readyz answers 200 (all running ones by default)."""
        deadline = time.monotonic() + timeout
        for name in names or tuple(self.procs):
            while True:
                self.check_alive()
                with contextlib.suppress(OSError):
                    if urllib.request.urlopen(self.url(name, "/readyz"), timeout=1).status == 200:
                        break
                if time.monotonic() > deadline:
                    raise ServiceError(
                        f"{name} not ready within {timeout:.0f} s; see {self.log_dir / (name + '.log')}"
                    )
                time.sleep(0.2)

    def wait_ingest_ready(self, timeout: float = 60.0) -> None:
        """Ingest is ready once the broker has acknowledged its telemetry subscription."""
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        while time.monotonic() < deadline:
            self.check_alive()
            with contextlib.suppress(OSError):
                body = urllib.request.urlopen(url, timeout=1).read().decode()
                if "pilotlab_ingest_subscribed 1.0" in body:
                    return
            time.sleep(0.2)
        raise ServiceError(
            f"ingest did not subscribe within {timeout:.0f} s; see {self.log_dir / 'ingest.log'}"
        )

    def wait_drained(
        self,
        expected_readings: int,
        expected_rejections: int,
        experiment_ids: list[str] | None = None,
        timeout: float = 180.0,
        limit: float = 1800.0,
    ) -> float:
        """Until every expected row is stored (of these experiments, or all) and no consumer
        lags; returns the seconds waited. Fails when nothing moved (rows stored, consumer lag)
        for ``timeout`` seconds, or after ``limit`` seconds in all: a slow machine still
        drains, a stuck pipeline is reported within ``timeout`` of stalling."""
        start = last_move = time.monotonic()
        bootstrap = self.state.kafka_bootstrap
        seen = None
        while True:
            self.check_alive()
            with psycopg.connect(self.state.database_url) as conn:
                args = {"ids": experiment_ids}
                readings = conn.execute(
                    "SELECT count(*) FROM readings WHERE %(ids)s::text[] IS NULL OR experiment_id = ANY(%(ids)s)",
                    args,
                ).fetchone()[0]
                rejections = conn.execute(
                    "SELECT count(*) FROM rejections WHERE %(ids)s::text[] IS NULL OR experiment_id = ANY(%(ids)s)",
                    args,
                ).fetchone()[0]
            streams_lag = sink_lag = None
            if readings >= expected_readings and rejections >= expected_rejections:
                streams_lag = lag_or_reason(bootstrap, "pilotlab-streams", (KafkaTopics.READINGS,))
                sink_lag = lag_or_reason(bootstrap, "pilotlab-sink", SINK_TOPICS)
                if streams_lag == 0 and sink_lag == 0:
                    return time.monotonic() - start
            now = time.monotonic()
            if (readings, rejections, streams_lag, sink_lag) != seen:
                seen, last_move = (readings, rejections, streams_lag, sink_lag), now
            if now - last_move > timeout or now - start > limit:
                why = f"nothing moved for {timeout:.0f} s" if now - last_move > timeout else f"{limit:.0f} s in all"
                raise ServiceError(
                    f"pipeline not drained ({why}, {now - start:.0f} s): readings {readings}/{expected_readings}, "
                    f"rejections {rejections}/{expected_rejections}, lag streams {streams_lag} sink {sink_lag}; "
                    f"see logs in {self.log_dir}"
                )
            time.sleep(0.5)

    def kill(self, name: str) -> None:
        """SIGKILL one service (for crash tests)."""
        proc = self.procs.pop(name)
        proc.kill()
        proc.wait()

    def stop(self, timeout: float = 20.0) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    def __enter__(self) -> Services:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
