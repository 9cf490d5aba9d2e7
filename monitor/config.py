"""Monitor settings: typed defaults, overridden by the process environment.

`NATS_URL=nats://10.0.0.5:4222 MONITOR_ADDR=127.0.0.1:9000 python -m monitor` works like the workers'
settings do (the NATS settings are the same class, workers/settings.py); a bad value stops the monitor with one
line naming the key (`ConfigError`).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import SettingsConfigDict

from workers.settings import ConfigError, NatsSettings, config_error, parse_addr

__all__ = ["ConfigError", "MonitorSettings", "load_settings"]


class MonitorSettings(NatsSettings):
    model_config = SettingsConfigDict(extra="ignore", validate_default=True)

    # NATS_URL: NatsSettings
    nats_connect_timeout: float = Field(default=5.0, gt=0)  # `tui --once` gives up after this
    monitor_addr: str = "127.0.0.1:8080"  # this machine only; other hosts: MONITOR_ADDR=:8080 with MONITOR_TOKEN
    monitor_token: str = ""  # when set, the dashboard, /api/* and /metrics require it
    # After a wrong token, an address waits this long for its answer, doubling with each further failure up to
    # the max; until the wait is over its next tries are refused (429) unchecked. The right token resets it.
    monitor_login_delay: float = Field(default=0.25, gt=0)
    monitor_login_delay_max: float = Field(default=8.0, gt=0)

    # registry
    purge_after: float = Field(default=3600.0, gt=0)  # seconds after it was last heard that an instance is dropped
    monitor_max_instances: int = Field(default=1000, ge=1)
    monitor_history_len: int = Field(default=300, ge=2)  # samples per model for the charts (10 min at 2 s)
    monitor_history_interval: float = Field(default=2.0, gt=0)  # seconds between samples
    monitor_requests_max: int = Field(default=500, ge=1, le=100_000)  # finished requests kept for the Requests view
    monitor_default_interval: float = Field(default=10.0, gt=0)  # when a body announces no interval
    # A heartbeat due at exactly 1x the interval arrives a little late; this share of the interval keeps
    # healthy workers from flickering to `stale` on every beat.
    monitor_stale_grace: float = Field(default=0.2, ge=0, le=1)
    monitor_max_message_bytes: int = Field(default=65536, ge=1024)  # larger bodies are dropped, not stored

    # loops
    monitor_sweep_interval: float = Field(default=60.0, gt=0)  # $SRV.PING + health requests
    monitor_sweep_wait: float = Field(default=0.6, gt=0)  # how long a sweep collects replies
    monitor_confirm_interval: float = Field(default=5.0, gt=0)  # earliest next sweep after a new heartbeat-only one
    monitor_tick_interval: float = Field(default=0.5, gt=0)  # status changes, purge, SSE pushes
    monitor_sse_ping: float = Field(default=15.0, gt=0)  # keep-alive comment on idle SSE streams
    monitor_sse_queue: int = Field(default=256, ge=8)  # events buffered per SSE client before it is dropped

    # No backpressure thresholds here: every level the monitor shows is the one its worker computed and sent.

    @field_validator("monitor_addr")
    @classmethod
    def _addr(cls, v: str) -> str:
        parse_addr(v, "MONITOR_ADDR")
        return v

    @property
    def host_port(self) -> tuple[str, int]:
        return parse_addr(self.monitor_addr, "MONITOR_ADDR")


def load_settings(**overrides: Any) -> MonitorSettings:
    """Settings from the environment (and `overrides`, for tests and the benchmark); ConfigError names the key."""
    try:
        return MonitorSettings(**overrides)
    except ValidationError as e:
        raise config_error(e) from None
