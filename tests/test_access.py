"""Who may use the worker's HTTP API and the monitor: the bearer key, the routes an exposed listener keeps closed,
the read-only shipped grammars.

In process over the real app, ledger, metrics and SQLite store, with the engine stand-in of tests/unit_support.py
where a request runs; tests/test_http_api.py runs the same rules on a real worker process and the real model.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio

from monitor.__main__ import exposure_warning
from monitor.config import MonitorSettings
from workers import protocol as p
from workers.access import is_loopback
from workers.config import ROOT, ConfigError, Settings, load_settings
from workers.formats.template import Template
from workers.grammars import GrammarStore
from workers.httpapi import build_app
from workers.metrics import Metrics
from workers.ops import broker
from workers.outcome import Ledger
from workers.runner import Runner
from workers.store import Store
from workers.surface import Gate, ModelCard

from .conftest import GEMMA_ENV
from .unit_support import ScriptedEngine

KEY = "s3cret-key-for-tests"
GEMMA = Template.load(ROOT / "data" / "models" / "gemma3-270m" / "prompt_template.json")
CHAT = {"model": "gemma3-270m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


@dataclass
class Host:
    """The worker as the HTTP app sees it (workers.surface.Serving), over real parts and the engine stand-in."""

    settings: Settings
    metrics: Metrics
    ledger: Ledger
    store: Store
    gate: Gate
    runner: Runner | None
    grammars: GrammarStore | None
    started_at: float = field(default_factory=time.time)
    status: p.WorkerStatus = "online"
    card: ModelCard = field(default_factory=ModelCard)

    async def cancel(self, req_id: str) -> str:  # as Worker.cancel without NATS: stopped here, or remembered
        state = self.runner.cancel(req_id) if self.runner else "queued"
        return state if state == "running" else "pending"

    async def events(self) -> list[tuple[str, str, str]]:
        await self.store.flush()
        con = sqlite3.connect(self.settings.log_path)
        try:
            return list(con.execute("SELECT level, code, msg FROM events ORDER BY id"))
        finally:
            con.close()


Serve = Callable[..., Any]


@pytest_asyncio.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Serve]:
    """`client, host = await serve(HTTP_ADDR=..., API_KEY=...)`: the worker's app on an in-process transport."""
    opened: list[tuple[Store, httpx.AsyncClient]] = []

    async def make(**overrides: Any) -> tuple[httpx.AsyncClient, Host]:
        values: dict[str, Any] = dict(model_name="gemma3-270m", data_dir=tmp_path / "data", worker_id="access-w",
                                      http_addr="127.0.0.1:5770")
        values.update({k.lower(): v for k, v in overrides.items()})
        settings = Settings(**values)
        store = Store(settings.log_path)
        await store.open()
        metrics = Metrics(settings.model_name)
        # llama.cpp's grammar parser needs a loaded model's vocabulary; the slow tier compiles them for real
        grammars = GrammarStore(settings.data_dir / "grammars", check=lambda _text: None)
        runner = Runner(model_name=settings.model_name, worker_id=settings.worker_id,
                        engine=ScriptedEngine(), fmt=GEMMA, grammars=grammars)  # type: ignore[arg-type]
        host = Host(settings, metrics, Ledger(store, metrics), store, Gate(4), runner, grammars)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(host)), base_url="http://worker")
        opened.append((store, client))
        return client, host

    yield make
    for store, client in opened:
        await client.aclose()
        await store.close()


def bearer(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --- the API key --------------------------------------------------------------------------------------------------

async def test_with_an_api_key_every_route_but_the_probes_is_a_401_without_it(serve: Serve):
    http, _ = await serve(API_KEY=KEY)
    calls = [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
             ("POST", "/v1/embeddings"), ("GET", "/metrics"), ("GET", "/logs"), ("GET", "/grammars"),
             ("GET", "/grammars/json"), ("POST", "/grammars"), ("PUT", "/grammars/mine"),
             ("DELETE", "/grammars/mine"), ("DELETE", "/v1/requests/r1"), ("GET", "/no/such/route")]
    for headers in ({}, bearer("wrong"), {"Authorization": f"Basic {KEY}"}, {"Authorization": "Bearer "}):
        for method, path in calls:
            r = await http.request(method, path, headers=headers, json=CHAT)
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            err = r.json()["error"]
            assert err["type"] == "authentication_error" and err["code"] == 401 and "Authorization: Bearer" in (
                err["message"])


async def test_with_the_api_key_the_routes_answer(serve: Serve):
    http, _ = await serve(API_KEY=KEY)
    assert (await http.get("/v1/models", headers=bearer())).json()["data"][0]["id"] == "gemma3-270m"
    chat = await http.post("/v1/chat/completions", headers=bearer(), json=CHAT)
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"] == "Hello, world"
    assert (await http.get("/metrics", headers={"authorization": f"bearer {KEY}"})).status_code == 200
    assert (await http.post("/grammars", headers=bearer(), json={"name": "mine", "gbnf": 'root ::= "a"'})
            ).status_code == 201
    assert (await http.get("/logs", headers=bearer())).status_code == 200
    assert (await http.delete("/v1/requests/r1", headers=bearer())).status_code == 202


async def test_healthz_and_readyz_answer_without_the_key(serve: Serve):
    http, _ = await serve(API_KEY=KEY)
    assert (await http.get("/healthz")).json()["status"] == "online"
    assert (await http.get("/readyz")).status_code == 200


async def test_the_openai_client_sends_its_api_key_as_the_bearer(serve: Serve):
    http, _ = await serve(API_KEY=KEY)
    client = openai.AsyncOpenAI(base_url="http://worker/v1", api_key=KEY, http_client=http, max_retries=0)
    chat = await client.chat.completions.create(model="gemma3-270m", max_tokens=4,
                                                messages=[{"role": "user", "content": "Hi"}])
    assert chat.choices[0].message.content == "Hello, world"
    wrong = openai.AsyncOpenAI(base_url="http://worker/v1", api_key="wrong", http_client=http, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await wrong.models.list()


async def test_the_key_is_never_logged_nor_recorded(serve: Serve, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.DEBUG)
    http, host = await serve(API_KEY=KEY, HTTP_ADDR=":5770")
    await http.post("/v1/chat/completions", headers=bearer(), json=CHAT)
    await http.get("/metrics", headers=bearer("wrong"))
    events = await host.events()
    assert [code for _, code, _ in events] == ["http.auth"]
    assert KEY not in caplog.text and KEY not in repr(events) and KEY not in repr(host.settings)
    assert KEY not in repr(build_app(host).user_middleware)


def test_api_key_file_holds_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("API_KEY", raising=False)
    key_file = tmp_path / "key"
    key_file.write_text(f"{KEY}\n")
    monkeypatch.setenv("API_KEY_FILE", str(key_file))
    assert load_settings(env_file=GEMMA_ENV).api_key.get_secret_value() == KEY


@pytest.mark.parametrize(("env", "words"), [
    ({"API_KEY_FILE": "{missing}"}, "API_KEY_FILE={missing} cannot be read (No such file or directory)"),
    ({"API_KEY_FILE": "{empty}"}, "API_KEY_FILE={empty} is empty"),
    ({"API_KEY_FILE": "{empty}", "API_KEY": KEY}, "set API_KEY or API_KEY_FILE, not both"),
])
def test_a_bad_api_key_file_is_one_line_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  env: dict[str, str], words: str):
    paths = {"missing": str(tmp_path / "nope"), "empty": str(tmp_path / "empty")}
    (tmp_path / "empty").write_text("\n")
    monkeypatch.delenv("API_KEY", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v.format(**paths))
    with pytest.raises(ConfigError) as e:
        load_settings(env_file=GEMMA_ENV)
    assert words.format(**paths) in str(e.value) and "\n" not in str(e.value) and KEY not in str(e.value)


# --- listeners beyond loopback --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.3.2.1", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("10.0.0.5", False), ("192.168.1.20", False), ("fleet.example", False),
])
def test_only_loopback_addresses_count_as_this_machine(host: str, loopback: bool):
    assert is_loopback(host) is loopback


async def test_on_all_interfaces_without_a_key_the_mutating_routes_are_403_and_say_why(
        serve: Serve, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="workers.httpapi")
    http, host = await serve(HTTP_ADDR=":5770")
    for method, path in [("POST", "/grammars"), ("PUT", "/grammars/mine"), ("DELETE", "/grammars/mine"),
                         ("DELETE", "/v1/requests/r1"), ("GET", "/logs")]:
        r = await http.request(method, path, json={"name": "mine", "gbnf": 'root ::= "a"'})
        assert r.status_code == 403, (method, path, r.text)
        message = r.json()["error"]["message"]
        assert "0.0.0.0:5770" in message and "API_KEY" in message and "HTTP_ADDR=127.0.0.1" in message
    # reading and inference stay open
    assert (await http.get("/grammars")).status_code == 200
    assert (await http.get("/grammars/json")).status_code == 200
    assert (await http.get("/v1/models")).status_code == 200 and (await http.get("/metrics")).status_code == 200
    assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "workers.httpapi"]
    assert len(lines) == 1 and "0.0.0.0:5770" in lines[0] and "set API_KEY" in lines[0], lines
    assert [(level, code) for level, code, _ in await host.events()] == [("warning", "http.closed")]


async def test_on_all_interfaces_with_a_key_the_mutating_routes_open(serve: Serve):
    http, _ = await serve(HTTP_ADDR="0.0.0.0:5770", API_KEY=KEY)
    assert (await http.get("/logs", headers=bearer())).status_code == 200
    assert (await http.delete("/grammars/never-stored", headers=bearer())).status_code == 404
    assert (await http.delete("/v1/requests/r1", headers=bearer())).status_code == 202


async def test_on_loopback_without_a_key_everything_is_open_and_nothing_is_said(
        serve: Serve, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="workers.httpapi")
    http, host = await serve(HTTP_ADDR="127.0.0.1:5770")
    assert (await http.get("/logs")).status_code == 200
    assert (await http.delete("/v1/requests/r1")).status_code == 202
    assert (await http.post("/grammars", json={"name": "mine", "gbnf": 'root ::= "a"'})).status_code == 201
    assert not [r for r in caplog.records if r.name == "workers.httpapi"] and await host.events() == []


# --- shipped grammars -----------------------------------------------------------------------------------------------

async def test_shipped_grammars_cannot_be_created_replaced_or_deleted(serve: Serve):
    http, _ = await serve(API_KEY=KEY)
    for r in [await http.put("/grammars/json", headers=bearer(), content='root ::= "x"'),
              await http.post("/grammars", headers=bearer(), json={"name": "json", "gbnf": 'root ::= "x"'}),
              await http.delete("/grammars/yes_no", headers=bearer())]:
        assert r.status_code == 403, r.text
        err = r.json()["error"]
        assert err["type"] == "read_only" and "ships with the project" in err["message"]
    shipped = (ROOT / "data" / "grammars" / "json.gbnf").read_text()
    assert (await http.get("/grammars/json", headers=bearer())).json()["gbnf"] == shipped


async def test_a_stored_grammar_never_shadows_a_shipped_name(tmp_path: Path):
    store = GrammarStore(tmp_path, check=lambda _text: None)
    (tmp_path / "json.gbnf").write_text('root ::= "x"')  # as an older version could have stored it
    assert store.get("json") == (ROOT / "data" / "grammars" / "json.gbnf").read_text()
    assert store.names()["json"] == "shipped"
    assert await store.resolve("json") == store.get("json")
    with pytest.raises(p.BadRequest) as e:
        await store.put("json", 'root ::= "y"')
    assert e.value.status == 403


# --- the monitor ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("addr", "token", "warns"), [
    ("0.0.0.0:8080", "", True), (":8080", "", True), ("10.0.0.5:8080", "", True),
    ("0.0.0.0:8080", "t0ken", False), ("127.0.0.1:8080", "", False), ("[::1]:8080", "", False),
])
def test_the_monitor_warns_when_other_machines_can_reach_it_without_a_token(addr: str, token: str, warns: bool):
    line = exposure_warning(MonitorSettings(monitor_addr=addr, monitor_token=token))
    assert (line is not None) is warns
    if line:
        assert "\n" not in line and "MONITOR_TOKEN" in line and "MONITOR_ADDR=127.0.0.1:8080" in line


async def test_a_monitor_on_all_interfaces_without_a_token_starts_and_says_so_once(nats_server: Any, tmp_path: Path):
    port = broker.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MONITOR_")}
    env.update(NATS_URL=nats_server.url, MONITOR_ADDR=f"0.0.0.0:{port}")
    log = tmp_path / "monitor.log"
    proc = subprocess.Popen([sys.executable, "-m", "monitor"], env=env, cwd=ROOT, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            for _ in range(200):
                try:
                    if (await http.get("/api/services")).status_code == 200:
                        break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"monitor not serving:\n{log.read_text()}")
    finally:
        proc.terminate()
        proc.wait(10)
    warnings = [line for line in log.read_text().splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and f"0.0.0.0:{port}" in warnings[0] and "MONITOR_TOKEN" in warnings[0], log.read_text()
