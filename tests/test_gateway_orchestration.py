"""Orchestration modes through the gateway: `critique`, `debate`, `ensemble` and `pipeline` over two real workers
(smollm2-135m and gemma3-270m), every step checked against the row its req_id left in its model's SQLite log: the
step ran, on the model the `orchestration` block names, with the earlier steps' answers in its prompt; the steps
that run side by side overlapped in time on the workers; a failed step fails the call and is named.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from workers.config import ROOT, load_settings
from workers.modelfile import resolve

from .conftest import GEMMA_ENV, GEMMA_TEMPLATE, WorkerProc, serve_nats, wait_online
from .gateway_support import GatewayProc, request_row, spawn_worker, start_gateway

pytestmark = pytest.mark.model  # the workers load real models

SMOL, GEMMA = "smollm2-135m", "gemma3-270m"
SMOL_ENV = ROOT / "envs" / "worker.smollm2-135m.env"
SYSTEM = {"role": "system", "content": "You answer in one short sentence."}
QUESTION = {"role": "user", "content": "What is the capital of France?"}
PARAMS = {"max_tokens": 16, "temperature": 0}


@dataclass
class Fleet:
    gateway: GatewayProc
    workers: dict[str, WorkerProc]

    async def chat(self, mode: str, **body: Any) -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.gateway.url, timeout=300) as http:
            return await http.post("/v1/chat/completions", json={
                "messages": [SYSTEM, QUESTION], "orchestration_mode": mode, **PARAMS, **body})

    def rows(self, block: dict[str, Any]) -> list[sqlite3.Row]:
        """Each step's row in its model's log: answered (status ok) with the tokens the block reports."""
        rows = [request_row(self.workers[s["model"]], s["req_id"], "status = 'ok'", timeout=60)
                for s in block["steps"]]
        for s, row in zip(block["steps"], rows, strict=True):
            assert (row["tokens_in"], row["tokens_out"]) == (s["tokens_in"], s["tokens_out"]), s["name"]
            assert json.loads(row["params_json"])["max_tokens"] == PARAMS["max_tokens"], s["name"]
        return rows


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("orchestration")
    servers = serve_nats(tmp)
    server = next(servers)
    data = tmp / "data"
    workers = {
        SMOL: spawn_worker(SMOL_ENV, server.url, data, tmp, MODEL_PATH=resolve(load_settings(SMOL))),
        GEMMA: spawn_worker(GEMMA_ENV, server.url, data, tmp, MODEL_PATH=model_path, PROMPT_TEMPLATE=GEMMA_TEMPLATE),
    }
    gateway: GatewayProc | None = None
    try:
        for w in workers.values():
            asyncio.run(wait_online(server.url, w))
        gateway = start_gateway(server.url, tmp)
        ends = time.monotonic() + 20
        while {m["id"] for m in httpx.get(f"{gateway.url}/v1/models", timeout=5).json()["data"]} != set(workers):
            assert time.monotonic() < ends, "the gateway did not discover both workers"
            time.sleep(0.1)
        yield Fleet(gateway, workers)
    finally:
        if gateway is not None:
            gateway.stop()
        for w in workers.values():
            w.kill()
        next(servers, None)


def steps_of(block: dict[str, Any]) -> list[tuple[str, str]]:
    return [(s["name"], s["model"]) for s in block["steps"]]


def prompt_of(row: sqlite3.Row) -> list[dict[str, str]]:
    """The messages the worker was sent for this step."""
    messages: list[dict[str, str]] = json.loads(row["raw_input"])["messages"]
    return messages


def window(row: sqlite3.Row) -> tuple[float, float]:
    """(enqueued, finished) on the worker's clock, in seconds."""
    return row["ts"] - (row["queue_ms"] + row["dur_ms"]) / 1000, row["ts"]


def overlapped(rows: list[sqlite3.Row]) -> bool:
    """Every one of them was enqueued before any of them finished: they ran side by side."""
    return max(window(r)[0] for r in rows) < min(window(r)[1] for r in rows)


async def test_critique_drafts_then_the_other_model_critiques_and_the_first_revises(fleet: Fleet) -> None:
    client = openai.AsyncOpenAI(base_url=f"{fleet.gateway.url}/v1", api_key="unused", max_retries=0, timeout=300)
    chat = await client.chat.completions.create(
        model=SMOL, messages=[SYSTEM, QUESTION], max_tokens=16, temperature=0,  # type: ignore[list-item]
        extra_body={"orchestration_mode": "critique", "models": [SMOL, GEMMA]})
    await client.close()
    block = chat.model_dump()["orchestration"]
    assert steps_of(block) == [("draft", SMOL), ("critique", GEMMA), ("revise", SMOL)]
    assert (block["mode"], block["models"], block["rounds"], block["final"]) == ("critique", [SMOL, GEMMA], 1,
                                                                                  "revise")
    draft, critique, revise = fleet.rows(block)
    assert prompt_of(draft) == [SYSTEM, QUESTION]
    assert prompt_of(critique)[0] == SYSTEM and draft["response_text"] in prompt_of(critique)[-1]["content"]
    assert critique["response_text"] in prompt_of(revise)[-1]["content"]
    assert chat.model == SMOL and chat.choices[0].message.content == revise["response_text"]
    assert chat.usage is not None and chat.usage.completion_tokens == sum(s["tokens_out"] for s in block["steps"])


async def test_debate_answers_side_by_side_then_the_first_model_reconciles(fleet: Fleet) -> None:
    resp = await fleet.chat("debate", model=SMOL, models=[SMOL, GEMMA])
    assert resp.status_code == 200, resp.text
    block = resp.json()["orchestration"]
    assert steps_of(block) == [("answer-a", SMOL), ("answer-b", GEMMA), ("reconcile", SMOL)]
    a, b, reconcile = fleet.rows(block)
    assert overlapped([a, b]), f"the two answers ran one after the other: {window(a)} {window(b)}"
    assert window(reconcile)[0] > max(window(a)[1], window(b)[1]), "reconcile started before both answers were in"
    combined = prompt_of(reconcile)[-1]["content"]
    assert a["response_text"] in combined and b["response_text"] in combined
    assert resp.json()["choices"][0]["message"]["content"] == reconcile["response_text"]


async def test_ensemble_asks_every_model_at_once_and_the_first_synthesises(fleet: Fleet) -> None:
    resp = await fleet.chat("ensemble", model=SMOL, models=[SMOL, GEMMA, SMOL])
    assert resp.status_code == 200, resp.text
    block = resp.json()["orchestration"]
    assert steps_of(block) == [("answer-1", SMOL), ("answer-2", GEMMA), ("answer-3", SMOL), ("synthesise", SMOL)]
    assert (block["models"], block["final"]) == ([SMOL, GEMMA], "synthesise")
    *answers, synthesis = fleet.rows(block)
    assert overlapped(answers), f"the answers did not all run at once: {[window(r) for r in answers]}"
    assert all(r["response_text"] in prompt_of(synthesis)[-1]["content"] for r in answers)
    assert resp.json()["choices"][0]["message"]["content"] == synthesis["response_text"]


async def test_pipeline_drafts_refines_and_validates_round_the_models(fleet: Fleet) -> None:
    resp = await fleet.chat("pipeline", model=GEMMA, models=[GEMMA, SMOL])
    assert resp.status_code == 200, resp.text
    block = resp.json()["orchestration"]
    assert steps_of(block) == [("draft", GEMMA), ("refine", SMOL), ("validate", GEMMA)]
    draft, refine, validate = fleet.rows(block)
    assert draft["response_text"] in prompt_of(refine)[-1]["content"]
    assert refine["response_text"] in prompt_of(validate)[-1]["content"]
    verdict, answer = validate["response_text"], resp.json()["choices"][0]["message"]["content"]
    if block["final"] == "refine":  # the validator let the refined answer stand
        assert not verdict.strip() or "PASS" in verdict.upper()[:12]
        assert answer == refine["response_text"] and resp.json()["model"] == SMOL
    else:
        assert block["final"] == "validate" and answer == verdict and resp.json()["model"] == GEMMA


async def test_a_failed_step_fails_the_call_with_its_status_and_names_the_step(fleet: Fleet) -> None:
    after_draft, beside_answer = await asyncio.gather(fleet.chat("critique", model=SMOL, models=[SMOL, "no-such"]),
                                                      fleet.chat("debate", model=SMOL, models=[SMOL, "no-such"]))
    for resp, step in ((after_draft, "critique"), (beside_answer, "answer-b")):
        assert resp.status_code == 404, resp.text
        error = resp.json()["error"]
        assert error["type"] == "orchestration_failed" and error["code"] == 404
        assert error["message"].startswith(f"the {step} step (no-such) failed: no model named 'no-such'")


async def test_an_unknown_mode_or_no_model_is_a_400(fleet: Fleet) -> None:
    unknown = await fleet.chat("vote", model=SMOL)
    assert unknown.status_code == 400
    error = unknown.json()["error"]
    assert error["type"] == "invalid_orchestration_mode"
    assert all(mode in error["message"] for mode in ("critique", "debate", "ensemble", "pipeline"))
    nobody = await fleet.chat("debate", models=[])
    assert nobody.status_code == 400 and nobody.json()["error"]["type"] == "invalid_model"


async def test_a_failed_step_stops_its_parallel_sibling_on_its_worker(fleet: Fleet) -> None:
    marker = f"lighthouse-{time.time_ns()}"
    resp = await fleet.chat("debate", model=SMOL, models=[SMOL, "no-such"], max_tokens=200,
                            messages=[{"role": "user", "content": f"Tell a very long story about the {marker}."}])
    assert resp.status_code == 404, resp.text

    def rows() -> list[str]:
        with sqlite3.connect(fleet.workers[SMOL].db) as db:
            return [r[0] for r in db.execute("SELECT status FROM requests WHERE instr(raw_input, ?) > 0", (marker,))]

    ends = time.monotonic() + 30
    while "cancelled" not in rows() and time.monotonic() < ends:
        await asyncio.sleep(0.2)
    assert rows() == ["cancelled"]  # answer-a was stopped, not generated to its end for nobody
