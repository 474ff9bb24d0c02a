"""Checks on the Docker deployment files (docker-compose.yml, deploy/): no Docker engine needed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from control.stack import free_port
from pilotlab.health import Health, default_port, serve

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DATASOURCE_FILE = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "pilotlab.yaml"
DASHBOARD_PROVIDER_FILE = ROOT / "deploy" / "grafana" / "provisioning" / "dashboards" / "pilotlab.yaml"

PILOTLAB_IMAGE = "pilotlab:local"
PILOTLAB_ENV = {
    "PILOTLAB_MQTT_URL": "mqtt://mosquitto:1883",
    "PILOTLAB_KAFKA_BOOTSTRAP": "kafka:9092",
}
# each database role's URL, and the only service that gets it (docs/operations.md)
DATABASE_URLS = {
    "migrate": (
        "PILOTLAB_DATABASE_OWNER_URL",
        "postgresql://pilotlab_owner:${PILOTLAB_DB_OWNER_PASSWORD:-pilotlab-owner-dev-only}@timescaledb:5432/pilotlab",
    ),
    "sink": (
        "PILOTLAB_DATABASE_URL",
        "postgresql://pilotlab_writer:${PILOTLAB_DB_WRITER_PASSWORD:-pilotlab-writer-dev-only}@timescaledb:5432/pilotlab",
    ),
}
ROLES_INIT_SCRIPT = ROOT / "deploy" / "timescaledb" / "initdb" / "10-pilotlab-roles.sh"
DEPENDS_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # KEY=VALUE form
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _depends_on(service: dict) -> dict[str, dict]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):  # short form: plain list of names
        return {name: {} for name in deps}
    return deps


def _pilotlab_services(compose: dict) -> dict[str, dict]:
    return {name: svc for name, svc in compose["services"].items() if svc.get("image") == PILOTLAB_IMAGE}


def test_docker_compose_config_is_valid() -> None:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not on PATH; cannot run `docker-compose config -q`")
    proc = subprocess.run(
        [exe, "-f", str(COMPOSE_FILE), "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        print(proc.stderr)
    assert proc.returncode == 0, f"docker-compose config failed:\n{proc.stderr}"


def test_compose_structure(compose: dict) -> None:
    services = compose["services"]
    for required in ("kafka", "mosquitto", "timescaledb", "grafana"):
        assert required in services, f"missing infrastructure service {required}"

    pilotlab = _pilotlab_services(compose)
    assert set(pilotlab) >= {"migrate", "topics", "ingest", "streams", "sink"}
    for name, svc in pilotlab.items():
        assert "build" in svc, f"{name}: pilotlab services are built from the repo Dockerfile"
        env = _env(svc)
        for var, value in PILOTLAB_ENV.items():
            assert env.get(var) == value, f"{name}: {var} is {env.get(var)!r}, expected {value!r}"

    # every depends_on target exists, with a condition compose understands
    for name, svc in services.items():
        for target, spec in _depends_on(svc).items():
            assert target in services, f"{name} depends on unknown service {target}"
            assert target != name
            if "condition" in spec:
                assert spec["condition"] in DEPENDS_CONDITIONS, f"{name} -> {target}: {spec['condition']}"

    # every healthcheck says what to run
    for name, svc in services.items():
        if "healthcheck" in svc:
            assert svc["healthcheck"].get("test"), f"{name}: healthcheck without test"

    # start-up order that matters: set-up jobs finish before the services that need them
    def condition(service: str, target: str) -> str | None:
        return _depends_on(services[service]).get(target, {}).get("condition")

    assert condition("migrate", "timescaledb") == "service_healthy"
    assert condition("topics", "kafka") == "service_healthy"
    assert condition("sink", "migrate") == "service_completed_successfully"
    for svc in ("ingest", "streams", "sink"):
        assert condition(svc, "topics") == "service_completed_successfully"
        assert services[svc].get("restart") == "unless-stopped"
    for oneshot in ("migrate", "topics"):
        assert services[oneshot].get("restart", "no") == "no", f"{oneshot} is a one-shot job"

    # named volumes that services use are declared
    declared = set(compose.get("volumes") or {})
    for name, svc in services.items():
        for vol in svc.get("volumes") or []:
            source = vol.split(":", 1)[0] if isinstance(vol, str) else vol.get("source", "")
            if source and not source.startswith((".", "/", "~")):
                assert source in declared, f"{name}: volume {source} is not declared"

    # files bind-mounted from the repo exist
    for name, svc in services.items():
        for vol in svc.get("volumes") or []:
            if isinstance(vol, str) and vol.startswith("./"):
                assert (ROOT / vol.split(":", 1)[0]).exists(), f"{name}: {vol} does not exist"


def test_grafana_provisioning(compose: dict) -> None:
    ds_doc = yaml.safe_load(DATASOURCE_FILE.read_text())
    assert ds_doc["apiVersion"] == 1
    (ds,) = ds_doc["datasources"]
    assert ds["uid"] == "pilotlab-db"
    assert ds["user"] == "grafana_reader"
    assert ds["type"] == "grafana-postgresql-datasource"
    assert ds["url"] == "timescaledb:5432"
    assert ds["jsonData"]["database"] == "pilotlab"
    assert ds["jsonData"]["timescaledb"] is True

    providers = yaml.safe_load(DASHBOARD_PROVIDER_FILE.read_text())["providers"]
    assert providers and all(p["type"] == "file" for p in providers)
    # the provider reads dashboards where compose mounts deploy/grafana/dashboards
    mounts = {
        vol.split(":")[1]
        for vol in compose["services"]["grafana"]["volumes"]
        if vol.startswith("./deploy/grafana/dashboards")
    }
    for p in providers:
        assert p["options"]["path"] in mounts, f"dashboard path {p['options']['path']} is not mounted"


def test_database_roles(compose: dict) -> None:
    """No pilotlab service logs in as the superuser: migrate as the owner, the sink as the
    writer, Grafana as the reader, each with the password the initdb script gave its role."""
    services = compose["services"]
    db = _env(services["timescaledb"])
    assert db["POSTGRES_USER"] == "postgres" and db["POSTGRES_DB"] == "pilotlab"
    passwords = {
        "pilotlab_owner": db["PILOTLAB_DB_OWNER_PASSWORD"],
        "pilotlab_writer": db["PILOTLAB_DB_WRITER_PASSWORD"],
        "grafana_reader": db["GRAFANA_DB_PASSWORD"],
    }
    for name, svc in _pilotlab_services(compose).items():
        env = _env(svc)
        urls = {k: v for k, v in env.items() if k.startswith("PILOTLAB_DATABASE")}
        expected = dict([DATABASE_URLS[name]]) if name in DATABASE_URLS else {}
        assert urls == expected, f"{name}: database URLs {urls}, expected {expected}"
        for url in urls.values():
            user, _, rest = url.removeprefix("postgresql://").partition(":")
            assert user in passwords and user != db["POSTGRES_USER"]
            assert rest.startswith(passwords[user] + "@timescaledb:5432/"), f"{name}: {user}'s password differs"
    grafana = _env(services["grafana"])
    assert grafana["GRAFANA_DB_PASSWORD"] == passwords["grafana_reader"]

    # the initdb script runs storage/roles.sql, mounted where it looks for it
    script = ROLES_INIT_SCRIPT.read_text()
    assert ROLES_INIT_SCRIPT.stat().st_mode & 0o111, "the entrypoint runs executable scripts (else it sources them)"
    mounts = dict(v.split(":")[:2] for v in services["timescaledb"]["volumes"] if v.startswith("./"))
    assert mounts["./deploy/timescaledb/initdb"] == "/docker-entrypoint-initdb.d"
    assert mounts["./storage/roles.sql"] == "/pilotlab/roles.sql" and "/pilotlab/roles.sql" in script
    for var in ("PILOTLAB_DB_OWNER_PASSWORD", "PILOTLAB_DB_WRITER_PASSWORD", "GRAFANA_DB_PASSWORD"):
        assert var in script
    # healthy only once the initdb scripts are done (they run on a socket-only server)
    assert "127.0.0.1" in services["timescaledb"]["healthcheck"]["test"]


# --- observability: health endpoints, Prometheus, its Grafana datasource ---------------------

PROMETHEUS_FILE = ROOT / "deploy" / "prometheus" / "prometheus.yml"
PROMETHEUS_DATASOURCE_FILE = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
SERVICES = ("ingest", "streams", "sink")


def _metrics_port(compose: dict, name: str) -> int:
    """The port the service serves /metrics, /healthz and /readyz on: its setting in the
    compose environment, else the settings' default."""
    env = _env(compose["services"][name])
    return int(env.get(f"PILOTLAB_{name.upper()}_METRICS_PORT") or default_port(name))


def test_services_have_healthchecks_on_their_health_endpoints(compose: dict) -> None:
    """Each service's healthcheck runs pilotlab.health (the image has python, no curl or wget),
    which asks /healthz and /readyz on the service's own port; the port is published on
    loopback only, so `curl localhost:PORT/metrics` works from the host."""
    for name in SERVICES:
        svc = compose["services"][name]
        hc = svc["healthcheck"]
        assert hc["test"] == ["CMD", "python", "-m", "pilotlab.health", name], name
        for key in ("interval", "timeout", "retries", "start_period"):
            assert key in hc, f"{name}: healthcheck without {key}"
        port = _metrics_port(compose, name)
        published = [p for p in svc.get("ports", []) if str(p).endswith(f":{port}")]
        assert len(published) == 1 and str(published[0]).startswith("127.0.0.1:"), f"{name}: {svc.get('ports')}"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "FROM python:" in dockerfile  # what the healthcheck runs; no curl/wget is installed


@pytest.mark.parametrize("name", SERVICES)
def test_the_healthcheck_command_follows_the_endpoints(compose: dict, name: str) -> None:
    """The compose healthcheck command itself, against a live pilotlab.health server on the
    service's port setting: 0 when alive and ready, 1 when not ready, 1 when not alive."""
    health = Health(name, ("connected",))
    port = free_port()
    server = serve(port, health, setting="test", addr="127.0.0.1")
    cmd = compose["services"][name]["healthcheck"]["test"][1:]  # after "CMD"
    assert cmd[0] == "python"
    env = {**os.environ, f"PILOTLAB_{name.upper()}_METRICS_PORT": str(port)}

    def run() -> int:
        proc = subprocess.run(
            [sys.executable, *cmd[1:]], env=env, cwd=ROOT, capture_output=True, timeout=30, check=False
        )
        return proc.returncode

    try:
        assert run() == 1  # alive, not ready
        health.set("connected", True)
        assert run() == 0
        health.stale_after_s = -1  # the loop stopped beating
        assert run() == 1
    finally:
        server.shutdown()
        server.server_close()


def test_prometheus_scrapes_the_three_services(compose: dict) -> None:
    services = compose["services"]
    prom = services["prometheus"]
    assert prom["image"].startswith("prom/prometheus:v")
    mounts = dict(v.split(":")[:2] for v in prom["volumes"] if v.startswith("./"))
    assert mounts["./deploy/prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    assert prom["healthcheck"]["test"][:2] == ["CMD", "wget"] and "/-/ready" in prom["healthcheck"]["test"][-1]
    assert str(prom["ports"][0]).startswith("127.0.0.1:")

    config = yaml.safe_load(PROMETHEUS_FILE.read_text())
    interval = config["global"]["scrape_interval"]
    scraped = {}
    for job in config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics"
        for static in job["static_configs"]:
            for target in static["targets"]:
                host, _, port = target.partition(":")
                scraped[host] = int(port)
    for name in SERVICES:
        assert scraped.get(name) == _metrics_port(compose, name), f"Prometheus scrapes {name} on {scraped.get(name)}"
        assert name in services

    # Grafana's datasource is this Prometheus, with its scrape interval
    ds_doc = yaml.safe_load(PROMETHEUS_DATASOURCE_FILE.read_text())
    assert ds_doc["apiVersion"] == 1
    (ds,) = ds_doc["datasources"]
    assert ds["uid"] == "pilotlab-prometheus" and ds["type"] == "prometheus"
    assert ds["url"] == "http://prometheus:9090" and ds["access"] == "proxy"
    assert ds["jsonData"]["timeInterval"] == interval
    defaults = [
        d["uid"]
        for path in DATASOURCE_FILE.parent.glob("*.y*ml")
        for d in yaml.safe_load(path.read_text())["datasources"]
        if d.get("isDefault")
    ]
    assert defaults == ["pilotlab-db"], "exactly one default datasource"
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in services["grafana"]["volumes"]
    assert "prometheus-data" in (compose.get("volumes") or {})
