"""What every process's settings share: the NATS connection, the backpressure thresholds, the one-line error.

The worker's `Settings` (workers/config.py) and the monitor's `MonitorSettings` (monitor/config.py) both build on
`NatsSettings` and `BackpressureSettings`, and both turn a pydantic `ValidationError` into one `ConfigError` line
that names the key and the fix with `config_error`.
"""

from __future__ import annotations

from typing import Self

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings

__all__ = ["BackpressureSettings", "ConfigError", "NatsSettings", "config_error", "parse_addr"]


class ConfigError(Exception):
    """A setting a user must fix; the message is the whole story."""


def parse_addr(value: str, key: str = "address") -> tuple[str, int]:
    """`:5770`, `5770`, `127.0.0.1:5770` or `[::1]:5770` → (host, port); an empty host means all interfaces."""
    v = value.strip()
    host, sep, port = v.rpartition(":")
    if not sep:
        host, port = "", v
    host = host.strip("[]") or "0.0.0.0"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{key} must look like ':5770' or '127.0.0.1:5770', got {value!r}")
    return host, int(port)


class NatsSettings(BaseSettings):
    """Where the NATS server is and how long the first connect may take."""

    nats_url: str = Field(default="nats://127.0.0.1:4222",
                          description="one URL or a comma-separated list: nats://host:4222,nats://other:4222")
    nats_connect_timeout: float = Field(default=30.0, gt=0,
                                        description="seconds the first connect may take before the process gives up")

    @field_validator("nats_url")
    @classmethod
    def _nats_url(cls, v: str) -> str:
        for part in v.split(","):
            if "://" not in part:
                raise ValueError(f"NATS_URL must look like nats://host:4222, got {v!r}")
        return v


class BackpressureSettings(BaseSettings):
    """The thresholds that turn a queue's state into a level (`protocol.backpressure_level`)."""

    backpressure_warning: float = Field(default=0.5, gt=0, description="from here the level is `warning`")
    backpressure_critical: float = Field(default=0.8, gt=0, description="from here the level is `critical`")

    @model_validator(mode="after")
    def _thresholds(self) -> Self:
        if self.backpressure_warning >= self.backpressure_critical:
            raise ValueError("BACKPRESSURE_WARNING must be below BACKPRESSURE_CRITICAL")
        return self


def config_error(e: ValidationError, where: str = "in the environment") -> ConfigError:
    """The first problem of `e` as one line naming the key, the value and where to fix it."""
    err = e.errors()[0]
    msg = err["msg"].removeprefix("Value error, ")
    if not err["loc"]:  # a check across fields: its message names the keys
        return ConfigError(f"config: {msg}; fix it {where}")
    key = str(err["loc"][0]).upper()
    if err["type"] == "missing":
        return ConfigError(f"config: {key} is required; set it {where}")
    return ConfigError(f"config: {key}={err.get('input')!r} is invalid ({msg}); fix it {where}")
