"""Monitor settings: typed defaults, overridden by the process environment.

`NATS_URL=nats://10.0.0.5:4222 MONITOR_ADDR=127.0.0.1:9000 python -m monitor` works like the workers'
settings do; a bad value stops the monitor with one line naming the key (`ConfigError`).
"""

from __future__ import annotations

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from workers.config import ConfigError, parse_addr

__all__ = ["ConfigError", "MonitorSettings", "load_settings"]


class MonitorSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", validate_default=True)

    nats_url: str = "nats://127.0.0.1:4222"
    nats_connect_timeout: float = Field(default=5.0, gt=0)  # `tui --once` gives up after this
    monitor_addr: str = ":8080"
    monitor_token: str = ""  # when set, the dashboard, /api/* and /metrics require it

    # registry
    purge_after: float = Field(default=3600.0, gt=0)  # seconds after it was last heard that an instance is dropped
    monitor_max_instances: int = Field(default=1000, ge=1)
    monitor_history_len: int = Field(default=120, ge=2)  # samples per model for the sparklines
    monitor_history_interval: float = Field(default=2.0, gt=0)  # seconds between samples
    monitor_default_interval: float = Field(default=10.0, gt=0)  # when a body announces no interval
    # A heartbeat due at exactly 1x the interval arrives a little late; this share of the interval keeps
    # healthy workers from flickering to `stale` on every beat.
    monitor_stale_grace: float = Field(default=0.2, ge=0, le=1)
    monitor_max_message_bytes: int = Field(default=65536, ge=1024)  # larger bodies are dropped, not stored

    # loops
    monitor_sweep_interval: float = Field(default=60.0, gt=0)  # $SRV.PING + health requests
    monitor_sweep_wait: float = Field(default=0.6, gt=0)  # how long a sweep collects replies
    monitor_tick_interval: float = Field(default=0.5, gt=0)  # status changes, purge, SSE pushes
    monitor_sse_ping: float = Field(default=15.0, gt=0)  # keep-alive comment on idle SSE streams
    monitor_sse_queue: int = Field(default=256, ge=8)  # events buffered per SSE client before it is dropped

    # used only when no worker has reported a level yet
    backpressure_warning: float = Field(default=0.5, gt=0)
    backpressure_critical: float = Field(default=0.8, gt=0)

    @field_validator("monitor_addr")
    @classmethod
    def _addr(cls, v: str) -> str:
        parse_addr(v, "MONITOR_ADDR")
        return v

    @field_validator("nats_url")
    @classmethod
    def _nats_url(cls, v: str) -> str:
        for part in v.split(","):
            if "://" not in part:
                raise ValueError(f"NATS_URL must look like nats://host:4222, got {v!r}")
        return v

    @model_validator(mode="after")
    def _thresholds(self) -> MonitorSettings:
        if self.backpressure_warning >= self.backpressure_critical:
            raise ValueError("BACKPRESSURE_WARNING must be below BACKPRESSURE_CRITICAL")
        return self

    @property
    def host_port(self) -> tuple[str, int]:
        return parse_addr(self.monitor_addr, "MONITOR_ADDR")


def load_settings(**overrides: object) -> MonitorSettings:
    """Settings from the environment (and `overrides`, for tests and the benchmark); ConfigError names the key."""
    try:
        return MonitorSettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as e:
        err = e.errors()[0]
        key = str(err["loc"][0]).upper() if err["loc"] else "?"
        msg = err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"config: {key}={err.get('input')!r} is invalid ({msg}); fix it in the environment") from None
