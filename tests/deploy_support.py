"""What tests/test_deploy.py and tests/test_deploy_k8s.py share: the default workers, the credential settings that
must never appear as values, a worker's settings from its env file alone and where its model file comes from."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from workers.config import ROOT, Settings, load_settings, parse_addr
from workers.modelfile import model_path
from workers.ops import fleet

DEFAULT_WORKERS = tuple(fleet.DEFAULT_WORKERS)  # what `make up` starts is what the deployments run
SECRET_KEYS = {"NATS_PASSWORD", "NATS_TOKEN", "API_KEY", "MONITOR_TOKEN", "NATS_USER"}  # never as values
SettingsOf = Callable[..., Settings]
IMAGE_DATA_DIR = "/var/lib/fleet"  # DATA_DIR of the Dockerfile and of deploy/k8s/common.yaml


@pytest.fixture(name="settings_of")
def settings_of_fixture(monkeypatch: pytest.MonkeyPatch) -> SettingsOf:
    """`settings_of(name, **env)`: a worker's settings from its env file plus `env`; this process's environment
    does not leak in."""
    def load(name: str, **env: str) -> Settings:
        for key in ("HTTP_ADDR", "NATS_URL", "DRAIN_TIMEOUT", "MODEL_THREADS", "WORKER_CONCURRENCY",
                    "STREAM_REPLICAS", "DATA_DIR", *SECRET_KEYS):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        return load_settings(name)
    return load


def port_of(addr: str) -> int:
    return parse_addr(addr)[1]


def on_models_volume(settings_of: SettingsOf, name: str) -> bool:
    """Whether the worker in a container (DATA_DIR=IMAGE_DATA_DIR) reads its model file from data/models/, the
    models volume `make models` fills, rather than from its package, where the file lies in the image."""
    path = model_path(settings_of(name, DATA_DIR=IMAGE_DATA_DIR))
    return path is not None and path.is_relative_to(ROOT / "data" / "models")
