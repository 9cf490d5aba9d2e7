"""The gateway: the official `openai` client against `python -m gateway`, every request forwarded over NATS to real
workers (gemma3-270m, minilm-l6-v2), the answers checked against the workers' own request logs.

One nats-server, the workers and one gateway for the module. A third worker (`minilm-spare`) is seen by the
gateway's discovery and then stopped, so the fleet knows a model with no live worker: 503 `no_worker`, while a name
discovery never saw is 404 `model_not_found`.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import nats
import openai
import pytest

from workers import protocol as p
from workers.config import ROOT, load_settings
from workers.modelfile import resolve

from .conftest import GEMMA_ENV, GEMMA_TEMPLATE, WorkerProc, serve_nats, wait_online
from .gateway_support import GatewayProc, models, request_row, spawn_worker, start_gateway, until

pytestmark = pytest.mark.model  # the workers load real models

MINILM_ENV = ROOT / "envs" / "worker.minilm-l6-v2.env"
CHAT, EMBED, GONE = "gemma3-270m", "minilm-l6-v2", "minilm-spare"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


@dataclass
class Fleet:
    gateway: GatewayProc
    workers: dict[str, WorkerProc]
    nats_url: str
    tmp: Path
    model_path: Path

    def client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)




@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("gateway")
    servers = serve_nats(tmp)
    server = next(servers)
    data = tmp / "data"
    minilm = resolve(load_settings(EMBED))
    workers = {
        CHAT: spawn_worker(GEMMA_ENV, server.url, data, tmp, MODEL_PATH=model_path, PROMPT_TEMPLATE=GEMMA_TEMPLATE),
        EMBED: spawn_worker(MINILM_ENV, server.url, data, tmp, MODEL_PATH=minilm),
        GONE: spawn_worker(MINILM_ENV, server.url, data, tmp, MODEL_PATH=minilm, MODEL_NAME=GONE),
    }
    gateway: GatewayProc | None = None
    try:
        for w in workers.values():
            asyncio.run(wait_online(server.url, w))
        gateway = start_gateway(server.url, tmp)
        gw = gateway
        until(lambda: set(models(gw)) == {CHAT, EMBED, GONE}, "the gateway did not discover the three workers")
        workers[GONE].terminate()
        until(lambda: models(gw)[GONE]["status"] == "offline", "the stopped worker is not shown offline")
        yield Fleet(gateway, workers, server.url, tmp, model_path)
    finally:
        if gateway is not None:
            gateway.stop()
        for w in workers.values():
            w.kill()
        next(servers, None)


async def test_chat_goes_over_nats_and_its_stream_joins_to_the_same_text(fleet: Fleet) -> None:
    client = fleet.client()
    messages = [{"role": "user", "content": "Name three colours."}]
    traceparent = f"00-{TRACE}-00f067aa0ba902b7-01"
    chat = await client.chat.completions.create(model=CHAT, messages=messages, max_tokens=24, temperature=0,
                                                extra_headers={"traceparent": traceparent})
    text = chat.choices[0].message.content
    assert text and chat.model == CHAT and chat.usage.completion_tokens > 0
    assert chat.choices[0].finish_reason in ("stop", "length")
    req_id = chat.id.removeprefix("chatcmpl-")
    row = request_row(fleet.workers[CHAT], req_id)
    assert row["source"] == "nats" and row["trace_id"] == TRACE and row["response_text"] == text

    stream = await client.chat.completions.create(model=CHAT, messages=messages, max_tokens=24, temperature=0,
                                                  stream=True)
    deltas, finish = [], None
    async for event in stream:
        assert event.model == CHAT
        deltas.append(event.choices[0].delta.content or "")
        finish = event.choices[0].finish_reason or finish
    assert "".join(deltas) == text and finish == chat.choices[0].finish_reason
    assert len([d for d in deltas if d]) > 1, "the answer should arrive in pieces"
    await client.close()


async def test_completion_and_embeddings(fleet: Fleet) -> None:
    client = fleet.client()
    done = await client.completions.create(model=CHAT, prompt="1, 2, 3,", max_tokens=6, temperature=0)
    assert done.model == CHAT and done.choices[0].text and done.usage.completion_tokens >= 1
    assert request_row(fleet.workers[CHAT], done.id.removeprefix("cmpl-"))["tokens_out"] == done.usage.completion_tokens
    # the openai client asks for base64 unless told otherwise, and decodes it
    vectors = await client.embeddings.create(model=EMBED, input=["hello", "world"])
    floats = await client.embeddings.create(model=EMBED, input="hello", encoding_format="float")
    assert vectors.model == EMBED and [len(d.embedding) for d in vectors.data] == [384, 384]
    assert vectors.usage.prompt_tokens > 0
    assert max(abs(a - b) for a, b in zip(floats.data[0].embedding, vectors.data[0].embedding, strict=True)) < 1e-3
    await client.close()


async def test_priority_in_the_body_or_header_reaches_the_workers_queue_of_that_priority(fleet: Fleet) -> None:
    client = fleet.client()
    nc = await nats.connect(fleet.nats_url)
    js = nc.jetstream()

    async def delivered() -> dict[int, int]:
        return {pr: (await js.consumer_info(p.STREAM_NAME, p.consumer_name("inference", CHAT, pr))).delivered
                .consumer_seq for pr in p.PRIORITIES}

    try:
        before = await delivered()
        await client.completions.create(model=CHAT, prompt="1, 2,", max_tokens=2, extra_body={"priority": 3})
        await client.completions.create(model=CHAT, prompt="1, 2,", max_tokens=2,
                                        extra_headers={p.H_PRIORITY: "2"})
        await client.embeddings.create(model=EMBED, input="hello", extra_body={"priority": 3})
        after = await delivered()
        assert {pr: after[pr] - before[pr] for pr in after} == {3: 1, 2: 1, 1: 0}
        with pytest.raises(openai.BadRequestError) as bad:
            await client.completions.create(model=CHAT, prompt="1,", max_tokens=2, extra_body={"priority": 5})
        assert bad.value.body["type"] == "invalid_priority" and "1, 2 or 3" in bad.value.body["message"]
    finally:
        await nc.close()
        await client.close()


async def test_models_lists_the_fleet_from_discovery(fleet: Fleet) -> None:
    client = fleet.client()
    listed = {m.id: m.model_dump() for m in (await client.models.list()).data}
    chat, embed = listed[CHAT], listed[EMBED]
    assert chat["object"] == "model" and chat["owned_by"] == "fleet"
    assert (chat["kind"], chat["instances"], chat["status"]) == ("inference", 1, "online")
    assert (embed["kind"], embed["instances"], embed["status"]) == ("embedding", 1, "online")
    assert embed["context_length"] == 512 and chat["context_length"] > 512
    assert "text-generation" in chat["capabilities"] and "embeddings" in embed["capabilities"]
    assert (listed[GONE]["instances"], listed[GONE]["status"]) == (0, "offline")
    await client.close()


async def test_unknown_model_is_404_and_a_model_without_a_worker_is_503(fleet: Fleet) -> None:
    client = fleet.client()
    with pytest.raises(openai.NotFoundError) as unknown:
        await client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "Hi"}])
    assert unknown.value.body["type"] == "model_not_found" and unknown.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError) as wrong:
        await client.chat.completions.create(model=EMBED, messages=[{"role": "user", "content": "Hi"}])
    assert wrong.value.body["type"] == "wrong_model_kind"
    with pytest.raises(openai.APIStatusError) as gone:
        await client.embeddings.create(model=GONE, input="hello")
    assert gone.value.status_code == 503 and gone.value.body["type"] == "no_worker"
    assert gone.value.response.headers["retry-after"] == "1"
    with pytest.raises(openai.APIStatusError) as late:  # the worker skips or stops it at the deadline: 504
        await client.completions.create(model=CHAT, prompt="1, 2, 3,", max_tokens=200,
                                        extra_headers={"Fleet-Timeout-Ms": "1"})
    assert late.value.status_code == 504
    await client.close()


async def test_client_disconnect_mid_stream_cancels_the_request_on_its_worker(fleet: Fleet) -> None:
    client = fleet.client()
    stream = await client.completions.create(model=CHAT, prompt="1, 2, 3, 4, 5,", max_tokens=400, temperature=0,
                                             stream=True)
    pieces = 0
    async for event in stream:
        req_id = event.id.removeprefix("cmpl-")
        pieces += 1
        if pieces == 3:
            break
    await stream.close()
    row = await asyncio.to_thread(request_row, fleet.workers[CHAT], req_id, "status = 'cancelled'")
    assert row["finish_reason"] == "cancelled" and row["tokens_out"] < 400
    await client.close()


async def test_health_and_readiness(fleet: Fleet) -> None:
    async with httpx.AsyncClient(base_url=fleet.gateway.url, timeout=5) as http:
        health = await http.get("/health")
        ready = await http.get("/health/ready")
    assert health.status_code == 200 and health.json()["nats_connected"] is True
    assert ready.status_code == 200 and set(ready.json()["models"]) == {CHAT, EMBED}


async def test_client_that_gives_up_on_a_plain_request_cancels_it_on_its_worker(fleet: Fleet) -> None:
    prompt = f"Count on forever, {time.time_ns()}: 1, 2, 3,"  # finds the worker's row: the client never got an id
    client = openai.AsyncOpenAI(base_url=f"{fleet.gateway.url}/v1", api_key="unused", max_retries=0, timeout=1.5)
    with pytest.raises(openai.APITimeoutError):
        await client.completions.create(model=CHAT, prompt=prompt, max_tokens=400, temperature=0)
    await client.close()

    def cancelled() -> sqlite3.Row | None:
        with sqlite3.connect(fleet.workers[CHAT].db) as db:
            db.row_factory = sqlite3.Row
            return db.execute("SELECT * FROM requests WHERE instr(raw_input, ?) > 0 AND status = 'cancelled'",
                              (prompt,)).fetchone()

    await asyncio.to_thread(until, lambda: cancelled() is not None, "the worker did not log the request cancelled")
    assert cancelled()["tokens_out"] < 400


async def test_a_worker_killed_during_a_gateway_stream_does_not_lose_it(fleet: Fleet) -> None:
    """SIGKILL of the worker streaming a gateway request: JetStream hands it to a restarted worker after ack_wait,
    which streams it again from the start; the client gets one text, the killed worker's chunks then the rest of
    the new worker's (the row's deliveries show the first worker had it)."""
    name = "gemma-killed"
    spawn = dict(MODEL_PATH=fleet.model_path, PROMPT_TEMPLATE=GEMMA_TEMPLATE, MODEL_NAME=name,
                 WORKER_CONCURRENCY=1, QUEUE_ACK_WAIT_S=3)
    first = spawn_worker(GEMMA_ENV, fleet.nats_url, fleet.tmp / "killed", fleet.tmp, **spawn)
    second = None
    try:
        await wait_online(fleet.nats_url, first)
        await asyncio.to_thread(until, lambda: name in models(fleet.gateway), "the gateway did not discover it")
        client = fleet.client()
        stream = await client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "Write a long story about a lighthouse."}],
            max_tokens=64, temperature=0, stream=True)
        deltas: list[str] = []
        async for event in stream:
            deltas.append(event.choices[0].delta.content or "")
            if len([d for d in deltas if d]) == 5 and second is None:  # mid-answer
                first.kill()
                second = spawn_worker(GEMMA_ENV, fleet.nats_url, fleet.tmp / "killed", fleet.tmp, **spawn)
        await client.close()
        assert second is not None, "the answer was shorter than expected"
        row = request_row(second, event.id.removeprefix("chatcmpl-"))
        assert row["status"] == "ok" and row["deliveries"] >= 2 and row["worker_id"].endswith(str(second.proc.pid))
        assert "".join(deltas) == row["response_text"]  # not the killed worker's start twice
    finally:
        for w in (first, second):
            if w is not None:
                w.kill()
