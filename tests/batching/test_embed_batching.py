"""An embedding worker (minilm-l6-v2 over real NATS) embeds requests that wait at the same time in one decode
(workers/embed_batch.py): each caller gets its own vectors, as if sent alone, and a bad request in the group is
refused on its own."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ask
from workers import protocol as p
from workers.config import ROOT, load_settings
from workers.engine import Engine
from workers.generation import Expired
from workers.modelfile import resolve

pytestmark = pytest.mark.model
MINILM_ENV = ROOT / "envs" / "worker.minilm-l6-v2.env"
SUBJECT = "embedding.request.minilm-l6-v2"
TOPICS = ["the harbour at dawn", "a broken violin", "tax forms", "alpine lakes", "a chess endgame", "sourdough bread",
          "volcanic islands", "the night train to Vienna", "quantum error correction", "my grandmother's garden",
          "a football derby", "jazz in small clubs", "solar panels on roofs", "a lost umbrella", "coral reefs",
          "the first snow of winter"]
TEXTS = [f"Request {i} is about {t}." for i, t in enumerate(TOPICS)]
# llama.cpp's f16 matmuls round a little differently for a batch than for one text: these texts differ from
# their lone vectors by 5e-5 on average and at most 8.9e-5 over 300 random groupings (measured directly).
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def minilm_path() -> Path:
    return resolve(load_settings("minilm-l6-v2"))


async def send_at_once(nc, bodies: list[dict[str, object]]) -> list[tuple[dict[str, object], dict[str, str]]]:
    """Publish every body before reading any answer, so they queue together; (body, headers) per request."""
    subs = []
    for body in bodies:
        inbox = nc.new_inbox()
        subs.append(await nc.subscribe(inbox, max_msgs=1))
        await nc.publish(SUBJECT, json.dumps(body).encode(), reply=inbox)
    await nc.flush()
    msgs = await asyncio.gather(*(sub.next_msg(timeout=60) for sub in subs))
    return [(json.loads(m.data), dict(m.headers or {})) for m in msgs]


def batch_ids(db: Path, prefix: str) -> dict[str, int | None]:
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT req_id, batch_id FROM requests WHERE req_id LIKE ? AND status = 'ok'",
                           (f"{prefix}%",)).fetchall()
    return dict(rows)


async def test_sixteen_requests_at_once_share_decodes_and_match_their_lone_vectors(start_worker, nc, minilm_path):
    w = await start_worker(MINILM_ENV, MODEL_PATH=str(minilm_path))
    alone = [np.asarray((await ask(nc, SUBJECT, {"req_id": f"alone-{i}", "input": t}))["data"][0]["embedding"])
             for i, t in enumerate(TEXTS)]
    together = await send_at_once(nc, [{"req_id": f"together-{i}", "input": t} for i, t in enumerate(TEXTS)])
    for i, (body, _) in enumerate(together):
        assert body["req_id"] == f"together-{i}" and len(body["data"]) == 1, body
        vec = np.asarray(body["data"][0]["embedding"])
        assert vec.shape == (384,)
        assert np.abs(vec - alone[i]).max() < TOLERANCE, (i, np.abs(vec - alone[i]).max())
    w.terminate()  # the log's writer flushes on the way out
    lone, grouped = batch_ids(w.db, "alone-"), batch_ids(w.db, "together-")
    assert len(lone) == len(grouped) == 16 and None not in lone.values() and None not in grouped.values()
    assert len(set(lone.values())) == 16  # one after the other: a decode each, nobody waited for company
    assert len(set(grouped.values())) < 16, grouped
    assert set(grouped.values()).isdisjoint(lone.values())


async def test_a_bad_request_in_a_group_is_refused_alone(start_worker, nc, minilm_path):
    w = await start_worker(MINILM_ENV, MODEL_PATH=str(minilm_path), EMBED_MAX_TOKENS=100)
    bodies: list[dict[str, object]] = [{"req_id": f"good-{i}", "input": t} for i, t in enumerate(TEXTS[:8])]
    bodies.insert(3, {"req_id": "too-long", "input": "word " * 600})  # over the model's 512 positions
    bodies.insert(6, {"req_id": "too-many", "input": TEXTS})  # ~170 tokens: more than EMBED_MAX_TOKENS
    answers = {body["req_id"]: (body, headers) for body, headers in await send_at_once(nc, bodies)
               if "req_id" in body}
    long_body, long_headers = answers.pop("too-long")
    assert long_body["error"]["type"] == "context_overflow" and long_headers[p.H_ERROR_CODE] == "400"
    assert "input[0] is 602 tokens" in long_body["error"]["message"]
    many_body, many_headers = answers.pop("too-many")
    assert many_body["error"]["type"] == "too_many_tokens" and many_headers[p.H_ERROR_CODE] == "400"
    assert sorted(answers) == [f"good-{i}" for i in range(8)]
    for i in range(8):
        got = np.asarray(answers[f"good-{i}"][0]["data"][0]["embedding"])
        alone = np.asarray((await ask(nc, SUBJECT, {"input": TEXTS[i]}))["data"][0]["embedding"])
        assert np.abs(got - alone).max() < TOLERANCE, i
    w.terminate()
    assert len(set(batch_ids(w.db, "good-").values())) < 8


async def test_a_deadline_or_an_abort_stops_only_between_decodes_and_others_are_served(minilm_path):
    engine = Engine(minilm_path, embedding=True, concurrency=1, ctx_size=512, threads=1, normalize=True,
                    embed_max_tokens=10**6)
    await engine.load()

    async def in_line(n: int) -> None:
        while engine.busy < n:
            await asyncio.sleep(0.005)

    try:
        many = TEXTS * 200  # 3,200 texts, 35,000 tokens: seconds of decodes
        late = asyncio.create_task(engine.embed(many, deadline_ms=p.now_ms() + 1500))
        await in_line(1)
        small = await engine.embed(TEXTS[:1])  # takes its turn between the big one's decodes
        assert len(small.vectors) == 1 and not late.done()
        with pytest.raises(Expired) as expired:
            await late
        assert 0 < expired.value.done < len(many) and engine.busy == 0
        running = asyncio.create_task(engine.embed(many))
        await in_line(1)
        waiting = asyncio.create_task(engine.embed(TEXTS[:1]))
        await in_line(2)
        engine.abort()  # a drain out of time: nothing more is decoded
        for task in (running, waiting):
            with pytest.raises(RuntimeError, match="aborted"):
                await task
    finally:
        engine.close()
