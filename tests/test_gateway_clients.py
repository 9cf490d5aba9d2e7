"""The gateway's clients, limits and response cache: API keys from a keys file, 401 without a good one, 429 with
Retry-After once a key's requests or tokens per minute are used up, deterministic answers kept in the shared KV
bucket (a second gateway on the same NATS answers from it, and the worker's log shows one request), and the
counters on /metrics.

One nats-server, gemma3-270m and minilm-l6-v2 workers and two gateways for the module, both with the same keys file
(one key made by scripts/gateway_keys.py) and CACHE_TTL_S=60.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request

from gateway.clients import Clients, Limited, load_keys
from gateway.config import load_settings as gateway_settings
from gateway.jobs import sign
from workers import protocol as p
from workers.config import ROOT, load_settings
from workers.modelfile import resolve
from workers.settings import ConfigError

from .conftest import GEMMA_ENV, GEMMA_TEMPLATE, WorkerProc, serve_nats, wait_online
from .gateway_support import GatewayProc, request_row, spawn_worker, start_gateway, until

pytestmark = pytest.mark.model  # the workers load real models

MINILM_ENV = ROOT / "envs" / "worker.minilm-l6-v2.env"
CHAT, EMBED = "gemma3-270m", "minilm-l6-v2"
KEYS = {"bob": "fk-bob-two-a-minute", "carol": "fk-carol-ten-tokens", "dave": "fk-dave-one-a-minute",
        "erin": "fk-erin-the-admin"}
LIMITS = {"bob": "rpm = 2", "carol": "tpm = 10", "dave": "rpm = 1", "erin": "admin = true"}
SECRET = "clients-test-webhook-secret"


@dataclass
class Fleet:
    gateways: list[GatewayProc]
    workers: dict[str, WorkerProc]
    keys: dict[str, str]
    opened: list[openai.AsyncOpenAI] = field(default_factory=list)

    def client(self, who: str = "alice", gateway: int = 0, key: str | None = None) -> openai.AsyncOpenAI:
        """An openai client of `who` (or with `key`), closed after the test."""
        client = openai.AsyncOpenAI(base_url=f"{self.gateways[gateway].url}/v1", api_key=key or self.keys[who],
                                    max_retries=0, timeout=120)
        self.opened.append(client)
        return client

    def rows(self, model: str, text: str) -> int:
        with sqlite3.connect(self.workers[model].db) as db:
            return int(db.execute("SELECT count(*) FROM requests WHERE raw_input LIKE ?", (f"%{text}%",))
                       .fetchone()[0])



def _models(gw: GatewayProc) -> set[str]:
    data = httpx.get(f"{gw.url}/v1/models", timeout=5).json()["data"]
    return {m["id"] for m in data if m["status"] == "online"}


def _keys_file(tmp: Path) -> tuple[Path, dict[str, str]]:
    path = tmp / "keys.toml"
    made = subprocess.run([sys.executable, "scripts/gateway_keys.py", "add", "alice", "--file", str(path)],
                          cwd=ROOT, capture_output=True, text=True, check=True)
    keys = {"alice": made.stdout.strip(), **KEYS}
    assert keys["alice"].startswith("fk-") and keys["alice"] not in path.read_text()
    with path.open("a") as f:
        for name, limit in LIMITS.items():
            f.write(f'\n[[keys]]\nname = "{name}"\nsha256 = "{hashlib.sha256(KEYS[name].encode()).hexdigest()}"\n'
                    f"{limit}\n")
    return path, keys


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("gateway-clients")
    servers = serve_nats(tmp)
    server = next(servers)
    data = tmp / "data"
    workers = {
        CHAT: spawn_worker(GEMMA_ENV, server.url, data, tmp, MODEL_PATH=model_path, PROMPT_TEMPLATE=GEMMA_TEMPLATE),
        EMBED: spawn_worker(MINILM_ENV, server.url, data, tmp, MODEL_PATH=resolve(load_settings(EMBED))),
    }
    gateways: list[GatewayProc] = []
    try:
        keys_file, keys = _keys_file(tmp)
        for _ in range(2):
            gateways.append(start_gateway(server.url, tmp, GATEWAY_KEYS_FILE=keys_file, CACHE_TTL_S=60,
                                          WEBHOOK_SECRET=SECRET))
        for w in workers.values():
            asyncio.run(wait_online(server.url, w))
        for gw in gateways:
            until(lambda g=gw: _models(g) == {CHAT, EMBED}, "a gateway did not discover both workers")
        yield Fleet(gateways, workers, keys)
    finally:
        for gw in gateways:
            gw.stop()
        for w in workers.values():
            w.kill()
        next(servers, None)


@pytest.fixture(autouse=True)
async def _close_clients(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    yield
    if "fleet" in request.fixturenames:
        fleet: Fleet = request.getfixturevalue("fleet")
        while fleet.opened:
            await fleet.opened.pop().close()


def _metrics(gw: GatewayProc) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{gw.url}/metrics", timeout=5).text  # open: no key
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _sum(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in metrics.items() if n == name and labels.items() <= dict(ls).items())


async def test_a_request_needs_a_known_key_in_either_header(fleet: Fleet) -> None:
    url = f"{fleet.gateways[0].url}/v1/embeddings"
    body = {"model": EMBED, "input": "who goes there", "encoding_format": "float"}
    async with httpx.AsyncClient(timeout=60) as http:
        missing = await http.post(url, json=body)
        assert missing.status_code == 401
        assert missing.json()["error"]["type"] == "missing_api_key" and missing.json()["error"]["code"] == 401
        by_header = await http.post(url, json=body, headers={"x-api-key": fleet.keys["alice"]})
        assert by_header.status_code == 200 and len(by_header.json()["data"][0]["embedding"]) == 384
        assert (await http.get(f"{fleet.gateways[0].url}/health")).status_code == 200  # probes stay open
    with pytest.raises(openai.AuthenticationError) as wrong:
        await fleet.client(key="fk-not-a-key-of-this-gateway").embeddings.create(model=EMBED, input="x")
    assert wrong.value.status_code == 401 and wrong.value.type == "invalid_api_key"
    good = await fleet.client().embeddings.create(model=EMBED, input="who goes there")
    assert len(good.data[0].embedding) == 384


async def test_only_an_admin_key_may_load_or_unload_a_model(fleet: Fleet) -> None:
    url = f"{fleet.gateways[0].url}/v1/models/{CHAT}"
    async with httpx.AsyncClient(timeout=60) as http:
        for verb in ("load", "unload"):
            refused = await http.post(f"{url}/{verb}", headers={"x-api-key": fleet.keys["alice"]})
            assert refused.status_code == 403 and refused.json()["error"]["type"] == "forbidden"
            assert "admin = true" in refused.json()["error"]["message"]
        # erin may: the gateway goes on to ask the host agents, and none runs beside this test's fleet
        admitted = await http.post(f"{url}/load", headers={"x-api-key": fleet.keys["erin"]})
        assert admitted.status_code == 503 and admitted.json()["error"]["type"] == "no_agent"


async def test_a_job_needs_a_key_at_once_and_a_signed_ingest_runs_without_one(fleet: Fleet) -> None:
    gw = fleet.gateways[0].url
    request = {"model": EMBED, "input": "a job of alice's", "encoding_format": "float"}
    async with httpx.AsyncClient(base_url=gw, timeout=60) as http:

        async def finished(job_id: str) -> dict[str, Any]:
            for _ in range(600):
                job = (await http.get(f"/v1/jobs/{job_id}")).json()
                if job["status"] not in ("queued", "running"):
                    return dict(job)
                await asyncio.sleep(0.1)
            raise AssertionError(f"job {job_id} did not finish")

        refused = await http.post("/v1/jobs", json={"request": request})
        assert refused.status_code == 401 and refused.json()["error"]["type"] == "missing_api_key"
        accepted = await http.post("/v1/jobs", json={"endpoint": "/v1/embeddings", "request": request},
                               headers={"x-api-key": fleet.keys["alice"]})
        assert accepted.status_code == 202, accepted.text
        done = await finished(accepted.json()["id"])
        assert done["status"] == "succeeded", json.dumps(done)
        # a signed webhook carries no key: its signature admits it, and its job runs as the client `webhook`
        body = json.dumps({"endpoint": "/v1/embeddings", "request": {**request, "input": "an ingested job"}}).encode()
        ingested = await http.post("/webhooks/ingest", content=body, headers={"X-Fleet-Signature": sign(SECRET, body)})
        assert ingested.status_code == 202, ingested.text
        job = await finished(ingested.json()["id"])
        assert job["status"] == "succeeded", job
        forged = await http.post("/v1/embeddings", json=request, headers={"x-fleet-internal": "guess"})
        assert forged.status_code == 401  # the marker of ingested jobs is a secret of the process


async def test_the_third_request_within_a_minute_of_a_two_rpm_key_is_429_with_retry_after(fleet: Fleet) -> None:
    client = fleet.client("bob")
    for i in range(2):
        await client.embeddings.create(model=EMBED, input=f"bob {i}")
    with pytest.raises(openai.RateLimitError) as limited:
        await client.embeddings.create(model=EMBED, input="bob 2")
    assert limited.value.type == "rate_limited"
    assert 1 <= int(limited.value.response.headers["retry-after"]) <= 60
    # another key is not affected
    assert (await fleet.client("alice").embeddings.create(model=EMBED, input="bob 2")).data


async def test_a_key_over_its_tokens_per_minute_is_refused_until_they_leave_the_window(fleet: Fleet) -> None:
    client = fleet.client("carol")
    first = await client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Hi carol"}],
                                                 max_tokens=4, temperature=0.8)
    assert first.usage is not None and first.usage.total_tokens > 10
    with pytest.raises(openai.RateLimitError) as limited:
        await client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "again"}],
                                             max_tokens=4, temperature=0.8)
    assert limited.value.type == "rate_limited" and "tokens per minute" in limited.value.message
    assert 1 <= int(limited.value.response.headers["retry-after"]) <= 60


async def test_a_greedy_chat_is_answered_once_and_then_from_the_shared_cache(fleet: Fleet) -> None:
    prompt, sampled = "Cache me: name a fruit.", "Do not cache me: name a tree."
    ask: dict[str, Any] = {"model": CHAT, "messages": [{"role": "user", "content": prompt}], "max_tokens": 4,
                           "temperature": 0}
    first = await fleet.client().chat.completions.with_raw_response.create(**ask)
    assert first.headers["x-fleet-cache"] == "miss"
    answer = first.http_response.json()
    request_row(fleet.workers[CHAT], answer["id"].removeprefix("chatcmpl-"))
    again = await fleet.client().chat.completions.with_raw_response.create(**ask)
    other = await fleet.client(gateway=1).chat.completions.with_raw_response.create(**ask, user="someone")
    for hit in (again, other):
        assert hit.headers["x-fleet-cache"] == "hit" and hit.http_response.json() == answer

    ids = []
    for gateway in (0, 1):
        raw = await fleet.client(gateway=gateway).chat.completions.with_raw_response.create(
            **{**ask, "messages": [{"role": "user", "content": sampled}], "temperature": 0.8})
        assert "x-fleet-cache" not in raw.headers
        ids.append(raw.http_response.json()["id"].removeprefix("chatcmpl-"))
    for req_id in ids:
        request_row(fleet.workers[CHAT], req_id)  # rows are written in order: any row for the hits is in by now
    assert len(set(ids)) == 2 and fleet.rows(CHAT, sampled) == 2
    assert fleet.rows(CHAT, prompt) == 1


async def test_embeddings_are_cached_across_gateways(fleet: Fleet) -> None:
    text = "an embedding worth keeping"
    first = await fleet.client().embeddings.with_raw_response.create(model=EMBED, input=text,
                                                                     encoding_format="float")
    assert first.headers["x-fleet-cache"] == "miss"
    request_row(fleet.workers[EMBED], first.headers[p.H_REQ_ID])
    hit = await fleet.client(gateway=1).embeddings.with_raw_response.create(model=EMBED, input=text,
                                                                            encoding_format="float")
    assert hit.headers["x-fleet-cache"] == "hit" and hit.http_response.json() == first.http_response.json()
    later = await fleet.client().embeddings.with_raw_response.create(model=EMBED, input="a later one")
    request_row(fleet.workers[EMBED], later.headers[p.H_REQ_ID])  # rows are written in order
    assert fleet.rows(EMBED, text) == 1


async def test_metrics_count_each_clients_requests_tokens_cache_and_limits(fleet: Fleet) -> None:
    gw = fleet.gateways[0]
    before = _metrics(gw)
    text = "counted on the metrics page"
    for _ in range(2):
        await fleet.client().embeddings.create(model=EMBED, input=text, encoding_format="float")
    dave = fleet.client("dave")
    await dave.embeddings.create(model=EMBED, input="dave")
    with pytest.raises(openai.RateLimitError):
        await dave.embeddings.create(model=EMBED, input="dave")
    async with httpx.AsyncClient(timeout=30) as http:
        assert (await http.post(f"{gw.url}/v1/embeddings", json={"model": EMBED, "input": "x"})).status_code == 401
    after = _metrics(gw)

    def delta(name: str, **labels: str) -> float:
        return _sum(after, name, **labels) - _sum(before, name, **labels)

    route = {"route": "/v1/embeddings"}
    assert delta("fleet_gateway_requests_total", client="alice", status="200", **route) == 2
    assert delta("fleet_gateway_requests_total", client="dave", status="200", **route) == 1
    assert delta("fleet_gateway_requests_total", client="dave", status="429", **route) == 1
    assert delta("fleet_gateway_requests_total", client="anonymous", status="401", **route) == 1
    assert delta("fleet_gateway_rate_limited_total", client="dave") == 1
    assert delta("fleet_gateway_cache_total", result="hit") == 1 and delta("fleet_gateway_cache_total",
                                                                           result="miss") == 2
    assert delta("fleet_gateway_tokens_total", client="alice", model=EMBED, direction="in") > 0
    assert delta("fleet_gateway_request_seconds_count", **route) == 5


def _request(key: str) -> Request:
    return Request({"type": "http", "method": "POST", "path": "/v1/chat/completions",
                    "headers": [(b"authorization", f"Bearer {key}".encode())]})


def test_limits_slide_over_the_last_sixty_seconds(tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    digest = hashlib.sha256(b"k").hexdigest()
    keys.write_text(f'[[keys]]\nname = "eve"\nsha256 = "{digest}"\nrpm = 2\ntpm = 100\n')
    now = [1000.0]
    clients = Clients(gateway_settings(gateway_keys_file=str(keys)), clock=lambda: now[0])
    assert clients.admit(_request("k")) == "eve"
    now[0] += 10
    clients.admit(_request("k"))
    now[0] += 20
    with pytest.raises(Limited) as refused:
        clients.admit(_request("k"))
    assert refused.value.status == 429 and refused.value.retry_after == 30  # the first leaves at +60
    now[0] += 30.5
    clients.admit(_request("k"))  # the first request left the window
    clients.used("eve", 60)
    now[0] += 5
    clients.used("eve", 50)
    now[0] += 5.5  # the second request left; 110 tokens in the window, the first 60 of them until +60
    with pytest.raises(Limited) as spent:
        clients.admit(_request("k"))
    assert "tokens per minute" in spent.value.message and spent.value.retry_after == 50


@pytest.mark.parametrize(("text", "problem"), [
    ('[[keys]\nname = "a"\n', "not valid TOML"),
    ('[[keys]]\nname = "a"\nsha256 = "the-key-itself"\n', "line 1: sha256 must be the 64 hex digits"),
    (f'[[keys]]\nname = "a"\nsha256 = "{"0" * 64}"\n\n[[keys]]\nname = "b"\nsha256 = "{"1" * 64}"\nrmp = 3\n',
     "line 5: unknown field 'rmp'"),
    (f'[[keys]]\nname = "a"\nsha256 = "{"0" * 64}"\n[[keys]]\nname = "a"\nsha256 = "{"1" * 64}"\n',
     "line 4: the name 'a' is taken"),
    (f'[[keys]]\nname = "a"\nsha256 = "{"0" * 64}"\nrpm = -1\n', "rpm must be a whole number"),
    (f'[[keys]]\nname = "a"\nsha256 = "{"0" * 64}"\nadmin = "yes"\n', "admin must be true or false"),
])
def test_a_bad_keys_file_names_the_file_the_line_and_the_fix(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as bad:
        load_keys(path)
    assert str(bad.value).startswith(f"GATEWAY_KEYS_FILE={path}") and problem in str(bad.value)
