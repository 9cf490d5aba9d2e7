"""Settings: env files, environment overrides, addresses, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from workers.config import ROOT, ConfigError, available_workers, load_settings, parse_addr


@pytest.mark.parametrize("value,expected", [
    (":5770", ("0.0.0.0", 5770)),
    ("127.0.0.1:5770", ("127.0.0.1", 5770)),
    ("5770", ("0.0.0.0", 5770)),
    ("[::1]:5770", ("::1", 5770)),
])
def test_addresses_accept_the_usual_spellings(value, expected):
    assert parse_addr(value) == expected


def test_the_catalogue_is_there():
    assert {"gemma3-270m", "gemma3-270m-embed", "qwen3-4b", "gpt-oss-20b", "nomic-embed-v1.5",
            "nomic-embed-v2-moe"} <= set(available_workers())
    ports = {n: load_settings(n).http_host_port[1] for n in available_workers()}
    assert ports["gemma3-270m"] == 5770 and ports["qwen3-4b"] == 5771 and ports["nomic-embed-v1.5"] == 5778
    assert load_settings("gemma3-270m-embed").model_kind == "embedding"


def test_environment_overrides_the_env_file(monkeypatch):
    monkeypatch.setenv("NATS_URL", "nats://10.1.2.3:4333")
    monkeypatch.setenv("WORKER_CONCURRENCY", "3")
    s = load_settings("gemma3-270m")
    assert s.nats_url == "nats://10.1.2.3:4333" and s.worker_concurrency == 3


@pytest.mark.parametrize("key,value,words", [
    ("WORKER_CONCURRENCY", "lots", "WORKER_CONCURRENCY='lots'"),
    ("HTTP_ADDR", "localhost", "HTTP_ADDR"),
    ("NATS_URL", "127.0.0.1:4222", "nats://host:4222"),
    ("MODEL_KIND", "chat", "MODEL_KIND='chat'"),
])
def test_bad_values_name_the_key(monkeypatch, key, value, words):
    monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as e:
        load_settings("gemma3-270m")
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_bad_value_stops_the_worker_with_one_line():
    env = {"PATH": "/usr/bin:/bin", "WORKER_CONCURRENCY": "0"}
    r = subprocess.run([sys.executable, "-m", "workers", "gemma3-270m"], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "WORKER_CONCURRENCY" in r.stderr and "Traceback" not in r.stderr


def test_no_nats_server_is_one_line(tmp_path):
    from workers.ops.broker import free_port

    env = {"PATH": "/usr/bin:/bin", "NATS_URL": f"nats://127.0.0.1:{free_port()}", "NATS_CONNECT_TIMEOUT": "1",
           "DATA_DIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "workers", "gemma3-270m"], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and "no NATS server answered" in r.stderr and "Traceback" not in r.stderr


def test_model_format_must_be_a_registered_prompt_format(monkeypatch):
    monkeypatch.setenv("MODEL_FORMAT", "alpaca")
    with pytest.raises(ConfigError, match=r"MODEL_FORMAT='alpaca' is invalid \(not a prompt format; use one of chat, "
                                          r"chatml, harmony, raw, template\)"):
        load_settings("gemma3-270m")
