"""The simulator's settings (``pilotlab simulate``, ``record``, ``replay``): one frozen object
from ``PILOTLAB_*`` variables, loaded with :func:`pilotlab.settings.load` like every service's."""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from pilotlab.settings import MqttUrl


class SimulatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PILOTLAB_", frozen=True, extra="ignore")

    mqtt_url: MqttUrl = Field(description="mqtt://host:port of the broker (credentials may be in the URL)")
    mqtt_username: str | None = None
    mqtt_password: SecretStr | None = None
    kafka_bootstrap: str | None = Field(default=None, description="to register the scenario's experiments")
    sim_connections: int = Field(default=4, ge=1, le=64, description="MQTT connections of the simulator")

    @property
    def password(self) -> str | None:
        return self.mqtt_password.get_secret_value() if self.mqtt_password else None
