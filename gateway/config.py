"""Gateway settings: typed defaults, overridden by the process environment.

`NATS_URL=nats://10.0.0.5:4222 GATEWAY_ADDR=127.0.0.1:9000 python -m gateway` works like the workers' and the
monitor's settings (the NATS connection and credentials are the same class, workers/settings.py); a bad value stops
the gateway with one line naming the key (`ConfigError`). Discovery runs the monitor's Feed and Registry, which read
their own MONITOR_SWEEP_* / PURGE_AFTER settings from the same environment (`discovery()`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from monitor.config import MonitorSettings
from monitor.config import load_settings as monitor_settings
from workers.config import ROOT
from workers.settings import ConfigError, NatsSettings, config_error, parse_addr, secret_from_file

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

    stream_replicas: int = Field(default=1, ge=1, le=5,
                                 description="copies of the gateway's KV buckets (cache, jobs) in a NATS cluster")

    # routing (routing.py)
    gateway_roles_file: Path = Field(default=ROOT / "envs" / "roles.toml",
                                     description="role aliases (primary, fast, coder, …) and task types → roles")
    gateway_routing: Literal["least_busy", "round_robin", "capability_match"] = Field(
        default="least_busy", description="how a role's models are ordered unless the body says `routing`")
    gateway_breaker_failures: int = Field(default=3, ge=1,
                                          description="consecutive failures or timeouts that open a model's breaker")
    gateway_breaker_cooldown_s: float = Field(default=30.0, gt=0,
                                              description="how long an open breaker routes around its model")

    # load and unload through the host agents (admin.py, workers/ops/agent.py)
    gateway_load_timeout_s: float = Field(default=330.0, gt=0,
                                          description="how long POST /v1/models/{id}/load waits for the host agent "
                                                      "(its AGENT_LOAD_TIMEOUT_S, 300, for the model to come up)")
    gateway_agent_wait_s: float = Field(default=0.5, gt=0, description="how long the agents are given to answer")

    # clients and limits (clients.py)
    gateway_keys_file: str = Field(default="", description="API keys (hashed) and their limits; empty: no keys")

    # response cache (cache.py)
    cache_ttl_s: float = Field(default=0.0, ge=0, description="keep deterministic answers this long; 0: off")

    # jobs and webhooks (jobs.py)
    jobs_ttl_s: float = Field(default=86400.0, gt=0, description="how long a job's result is kept")
    webhook_secret: SecretStr = Field(default=SecretStr(""), description="HMAC key of callbacks and ingest")
    webhook_secret_file: str = Field(default="", description="a file holding WEBHOOK_SECRET (a mounted secret)")

    @model_validator(mode="after")
    def _webhook_secret_file(self) -> GatewaySettings:
        self.webhook_secret = secret_from_file(self.webhook_secret, self.webhook_secret_file, "WEBHOOK_SECRET")
        return self

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
