"""The portal's one frozen settings object (``pilotlab serve``), read from ``PILOTLAB_*`` at
start-up like every service's (pilotlab/settings.py); an invalid value stops it with the
variable's name.

The session secret has no default: without ``PILOTLAB_PORTAL_SESSION_SECRET`` (32 characters
or more) the portal does not start. Only ``pilotlab serve`` on the embedded stack fills it,
explicitly, from a file it creates in the stack's data directory (dashboards/portal/cli.py).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, model_validator

from pilotlab.settings import MqttUrl, PostgresUrl, _Settings


class PortalSettings(_Settings):
    portal_host: str = Field(default="127.0.0.1", description="address to listen on")
    portal_port: int = Field(default=8088, ge=1, le=65535)
    # the read side: PILOTLAB_PORTAL_DATABASE_URL, else PILOTLAB_DATABASE_READER_URL. Startup
    # requests run inside storage.access.scoped, which switches to the startup's role.
    portal_database_url: PostgresUrl | None = Field(default=None, description="postgresql://… (the portal's role)")
    database_reader_url: PostgresUrl | None = Field(default=None, description="postgresql://grafana_reader:…")
    portal_session_secret: SecretStr = Field(min_length=32, description="signs the session cookie")
    portal_session_max_age_s: int = Field(default=8 * 3600, ge=60, le=30 * 86400)
    # the cookie's Secure flag: on behind TLS (a reverse proxy); off for http://127.0.0.1
    portal_https_only: bool = False
    portal_refresh_s: float = Field(default=3.0, ge=0.5, le=3600, description="htmx polling of live parts")
    portal_pool_size: int = Field(default=4, ge=1, le=64)
    # device credentials shown to a startup: the broker devices connect to (any user:password in
    # the URL is dropped) and the lab's secret their passwords derive from (pilotlab.credentials):
    # PILOTLAB_CREDENTIALS_SECRET as for `credentials files`, or the embedded stack's directory
    # holding its secret file (PILOTLAB_PORTAL_CREDENTIALS_DIR). Neither: the portal says so.
    mqtt_url: MqttUrl | None = Field(default=None, description="mqtt://host:port devices connect to")
    portal_mqtt_url: MqttUrl | None = Field(default=None, description="overrides PILOTLAB_MQTT_URL for devices")
    credentials_secret: SecretStr | None = None
    portal_credentials_dir: Path | None = None

    @model_validator(mode="after")
    def _database_set(self) -> PortalSettings:
        # never PILOTLAB_DATABASE_URL: that is the sink's role, which may write
        if not (self.portal_database_url or self.database_reader_url):
            raise ValueError("set PILOTLAB_PORTAL_DATABASE_URL (or PILOTLAB_DATABASE_READER_URL)")
        return self

    @property
    def database_url(self) -> str:
        """The URL the portal connects with."""
        return self.portal_database_url or self.database_reader_url or ""

    @property
    def device_broker_url(self) -> str | None:
        return self.portal_mqtt_url or self.mqtt_url
