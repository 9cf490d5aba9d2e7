"""Gateway settings: typed defaults, overridden by the process environment.

`NATS_URL=nats://10.0.0.5:4222 GATEWAY_ADDR=127.0.0.1:9000 python -m gateway` works like the workers' and the
monitor's settings (the NATS connection and credentials are the same class, workers/settings.py); a bad value stops
the gateway with one line naming the key (`ConfigError`). Discovery runs the monitor's Feed and Registry, which read
their own MONITOR_SWEEP_* / PURGE_AFTER settings from the same environment (`discovery()`).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import SettingsConfigDict

from monitor.config import MonitorSettings
from monitor.config import load_settings as monitor_settings
from workers.settings import ConfigError, NatsSettings, config_error, parse_addr

__all__ = ["ConfigError", "GatewaySettings", "load_settings"]


class GatewaySettings(NatsSettings):
    model_config = SettingsConfigDict(extra="ignore", validate_default=True)

    # NATS_URL and the credential settings: NatsSettings
    gateway_addr: str = Field(default="127.0.0.1:8000",
                              description="where the OpenAI API listens; other hosts: GATEWAY_ADDR=:8000")
    gateway_timeout_s: float = Field(default=300.0, gt=0,
                                     description="how long a request may take, queue wait included, unless the "
                                                 "client sends Fleet-Timeout-Ms; the worker gets it as the deadline")
    gateway_max_timeout_s: float = Field(default=3600.0, gt=0, description="the most a Fleet-Timeout-Ms may ask")
    gateway_max_request_bytes: int = Field(default=1024 * 1024, ge=1024,
                                           description="larger bodies are refused (413) before they are read")

    @field_validator("gateway_addr")
    @classmethod
    def _addr(cls, v: str) -> str:
        parse_addr(v, "GATEWAY_ADDR")
        return v

    @property
    def host_port(self) -> tuple[str, int]:
        return parse_addr(self.gateway_addr, "GATEWAY_ADDR")

    def discovery(self) -> MonitorSettings:
        """The settings of the in-process Feed and Registry: this gateway's NATS connection, the rest (sweep and
        purge intervals) from the environment as the monitor reads them."""
        return monitor_settings(**{k: getattr(self, k) for k in NatsSettings.model_fields})


def load_settings(**overrides: Any) -> GatewaySettings:
    """Settings from the environment (and `overrides`, for tests); ConfigError names the key."""
    try:
        return GatewaySettings(**overrides)
    except ValidationError as e:
        raise config_error(e) from None
