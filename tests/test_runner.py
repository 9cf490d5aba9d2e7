"""The runner on a stand-in engine: the prompt format, stop strings, output parsing and cancel bookkeeping that
sit between a request and llama.cpp (the real model runs the same code in the slow tier)."""

from __future__ import annotations

import datetime as dt
import threading

import pytest

from workers import protocol as p
from workers.config import ROOT
from workers.formats.harmony import Harmony
from workers.formats.template import Template
from workers.generation import Expired
from workers.runner import Runner

from .unit_support import ScriptedEngine

GEMMA = Template.load(ROOT / "data" / "models" / "gemma3-270m" / "prompt_template.json")


def runner(engine: ScriptedEngine, fmt=GEMMA) -> Runner:  # type: ignore[no-untyped-def]
    return Runner(model_name="m", worker_id="w", engine=engine, fmt=fmt, grammars=None)  # type: ignore[arg-type]


async def test_the_prompt_is_formatted_and_the_formats_stop_strings_reach_the_engine():
    engine = ScriptedEngine()
    req = p.InferenceRequest.model_validate({"input": "Hi", "params": {"stop": ["###"], "max_tokens": 5}})
    done = await runner(engine).execute(req, "r1", queue_ms=12.0)
    call = engine.calls[0]
    assert call["prompt"] == "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert call["stop"] == ("<end_of_turn>",) and call["params"].stop == ["###"]
    assert isinstance(done.body, p.InferenceResponse) and done.body.queue_ms == 12.0 and done.body.model == "m"
    assert done.facts.formatted_input == call["prompt"] and done.facts.params_json == '{"max_tokens":5,"stop":["###"]}'


async def test_raw_requests_skip_the_format_and_its_output_parsing():
    engine = ScriptedEngine(pieces=("<|channel|>final<|message|>", "Yo"))
    harmony = Harmony("I", "2024-06", "low", today=lambda: dt.date(2026, 1, 1))
    raw = p.InferenceRequest.model_validate({"input": "as is", "raw": True})
    done = await runner(engine, harmony).execute(raw, "r2")
    assert engine.calls[0]["prompt"] == "as is" and done.body.text == "<|channel|>final<|message|>Yo"  # type: ignore[union-attr]
    parsed = await runner(engine, harmony).execute(p.InferenceRequest.model_validate({"input": "x"}), "r3")
    assert parsed.body.text == "Yo" and parsed.facts.response_text == "Yo"  # type: ignore[union-attr]


async def test_a_cancel_before_the_run_is_remembered_once():
    r = runner(ScriptedEngine())
    assert r.cancel("later") == "queued"
    assert r.was_cancelled("later") and not r.was_cancelled("later")


async def test_embeddings_come_back_in_order_with_usage():
    engine = ScriptedEngine()
    r = Runner(model_name="e", worker_id="w", engine=engine, fmt=None, grammars=None)  # type: ignore[arg-type]
    done = await r.execute(p.EmbeddingRequest.model_validate({"input": ["a b", "ccc"]}), "e1")
    assert isinstance(done.body, p.EmbeddingResponse)
    assert [d.embedding for d in done.body.data] == [[3.0, 1.0], [3.0, 1.0]] and done.body.usage.prompt_tokens == 3
    assert done.facts.response_text == "2 vector(s) of 2"


async def test_a_cancel_from_another_owner_neither_stops_nor_skips_a_request():
    r = runner(ScriptedEngine())
    assert r.cancel("q", owner="mallory") == "queued"
    assert not r.was_cancelled("q", owner="alice")  # remembered for mallory's own request only
    assert r.cancel("q2", owner="alice") == "queued" and r.was_cancelled("q2", owner="alice")
    assert r.cancel("q3") == "queued" and r.was_cancelled("q3", owner="alice")  # the open subject: anyone's
    r.running["live"] = (stop := threading.Event(), "alice")
    assert r.cancel("live", owner="mallory") == "refused" and not stop.is_set()
    assert r.cancel("live", owner="alice") == "running" and stop.is_set()


@pytest.mark.parametrize(("req", "says"), [
    (p.InferenceRequest.model_validate({"input": "x"}), "while generating, after 3 tokens"),
    (p.EmbeddingRequest.model_validate({"input": ["a", "b", "c", "d"]}), "while embedding, after 3 of 4 inputs"),
])
async def test_a_deadline_that_passes_while_running_is_a_504_and_no_answer(req: p.InferenceRequest, says: str):
    engine = ScriptedEngine(fail=Expired(3))
    r = Runner(model_name="m", worker_id="w", engine=engine, fmt=GEMMA, grammars=None)  # type: ignore[arg-type]
    deadline = p.now_ms() + 60_000
    with pytest.raises(p.BadRequest) as e:
        await r.execute(req, "late", deadline_ms=deadline)
    assert engine.calls[0]["deadline_ms"] == deadline  # the engine checks it while it works
    assert (e.value.status, e.value.type) == (504, "expired") and says in e.value.message
    assert "late" not in r.running  # the cancel bookkeeping is cleared either way


def test_the_owner_of_an_inbox_is_its_second_token():
    assert p.inbox_owner("_INBOX.alice.abc123") == "alice"
    assert p.inbox_owner("_INBOX.Kq3xZ.4") == "Kq3xZ"  # nats-py request(): the connection's own prefix
    assert p.inbox_owner("_INBOX.abc123") is None and p.inbox_owner(None) is None and p.inbox_owner("x.y.z") is None
    assert p.owner_cancel_subject("inference", "alice", "nomic-embed-v1.5") == "inference.cancel.alice.nomic-embed-v1.5"
