"""What tests/test_deploy.py and tests/test_deploy_k8s.py share: the default workers, the credential settings that
must never appear as values, and a worker's settings from its env file alone."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from workers.config import Settings, load_settings, parse_addr

DEFAULT_WORKERS = ("gemma3-270m", "gemma3-270m-embed", "minilm-l6-v2")  # `fleet up`'s defaults (workers/ops/fleet.py)
SECRET_KEYS = {"NATS_PASSWORD", "NATS_TOKEN", "API_KEY", "MONITOR_TOKEN", "NATS_USER"}  # never as values
SettingsOf = Callable[..., Settings]


@pytest.fixture(name="settings_of")
def settings_of_fixture(monkeypatch: pytest.MonkeyPatch) -> SettingsOf:
    """`settings_of(name, **env)`: a worker's settings from its env file plus `env`; this process's environment
    does not leak in."""
    def load(name: str, **env: str) -> Settings:
        for key in ("HTTP_ADDR", "NATS_URL", "DRAIN_TIMEOUT", "MODEL_THREADS", "WORKER_CONCURRENCY",
                    "STREAM_REPLICAS", *SECRET_KEYS):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        return load_settings(name)
    return load


def port_of(addr: str) -> int:
    return parse_addr(addr)[1]
