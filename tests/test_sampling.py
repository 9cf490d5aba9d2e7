"""Every sampling parameter reaches llama.cpp and changes what comes back, on both engines (one context per
request, and the batching scheduler's native sampler chains)."""

from __future__ import annotations

import pytest
import pytest_asyncio

from .conftest import ask

pytestmark = pytest.mark.model  # every test here starts a worker that loads the model

SUBJECT = "inference.request.gemma3-270m"
STORY = "Write a short story about a lighthouse keeper."


@pytest_asyncio.fixture(params=["contexts", "batched"])
async def gen(request, start_worker, nc):
    await start_worker(ENGINE=request.param)

    async def run(input: str = STORY, raw: bool = False, **params):
        return await ask(nc, SUBJECT, {"input": input, "raw": raw, "params": params})

    return run


async def test_temperature_zero_is_deterministic(gen):
    a = await gen(max_tokens=24, temperature=0)
    b = await gen(max_tokens=24, temperature=0)
    assert a["text"] == b["text"] and a["tokens_out"] == 24


async def test_same_seed_repeats_and_different_seeds_differ(gen):
    a = await gen(max_tokens=24, temperature=1.0, seed=7)
    b = await gen(max_tokens=24, temperature=1.0, seed=7)
    assert a["text"] == b["text"]
    others = {(await gen(max_tokens=24, temperature=1.0, seed=s))["text"] for s in (8, 9, 10)}
    assert others - {a["text"]}, "different seeds all gave the seed-7 text"


async def test_top_k_one_and_tiny_top_p_are_greedy(gen):
    greedy = (await gen(max_tokens=20, temperature=0))["text"]
    k1 = [(await gen(max_tokens=20, temperature=1.5, top_k=1, seed=s))["text"] for s in (1, 2)]
    p_small = [(await gen(max_tokens=20, temperature=1.5, top_p=0.001, seed=s))["text"] for s in (1, 2)]
    hot = {(await gen(max_tokens=20, temperature=1.5, seed=s))["text"] for s in (1, 2)}
    assert k1 == [greedy, greedy] and p_small == [greedy, greedy]
    assert hot != {greedy}, "temperature 1.5 without top_k/top_p should not be greedy"


async def test_repeat_penalty_changes_the_text(gen):
    prompt = "the cat the cat the cat the cat the cat the cat"
    plain = await gen(prompt, raw=True, max_tokens=16, temperature=0, repeat_penalty=1.0)
    penalised = await gen(prompt, raw=True, max_tokens=16, temperature=0, repeat_penalty=2.0)
    assert plain["text"] != penalised["text"]


async def test_stop_string_ends_the_text(gen):
    free = await gen("1, 2, 3, 4, 5,", raw=True, max_tokens=12, temperature=0)
    assert "," in free["text"]
    stopped = await gen("1, 2, 3, 4, 5,", raw=True, max_tokens=12, temperature=0, stop=[","])
    assert "," not in stopped["text"] and stopped["finish_reason"] == "stop"
    assert free["text"].startswith(stopped["text"]) and stopped["tokens_out"] < free["tokens_out"]


async def test_max_tokens_reached_is_length(gen):
    out = await gen(max_tokens=5, temperature=0)
    assert out["finish_reason"] == "length" and out["tokens_out"] == 5


async def test_raw_bypasses_the_template(start_worker, nc):
    """The log keeps the exact text the model saw: templated for a normal request, untouched for raw."""
    import asyncio
    import sqlite3

    w = await start_worker()
    await ask(nc, SUBJECT, {"req_id": "tpl", "input": "Hello there", "params": {"max_tokens": 2}})
    await ask(nc, SUBJECT, {"req_id": "raw", "input": "Hello there", "raw": True, "params": {"max_tokens": 2}})
    await asyncio.sleep(1.0)
    with sqlite3.connect(w.db) as db:
        rows = dict(db.execute("SELECT req_id, formatted_input FROM requests").fetchall())
    assert rows["tpl"] == "<start_of_turn>user\nHello there<end_of_turn>\n<start_of_turn>model\n"
    assert rows["raw"] == "Hello there"


async def test_logit_bias_min_p_and_frequency_presence_penalties(gen):
    plain = await gen(max_tokens=12, temperature=0)
    forced = await gen(max_tokens=4, temperature=0, logit_bias={"10": 100})  # OpenAI sends token ids as strings
    assert forced["tokens_out"] == 4 and forced["text"] != plain["text"]
    bad = await gen(max_tokens=4, logit_bias={"99999999": 1})
    assert bad["error"]["code"] == 400 and "logit_bias names token 99999999" in bad["error"]["message"]
    penalised = await gen(max_tokens=12, temperature=0, frequency_penalty=2.0, presence_penalty=2.0)
    assert penalised["text"] != plain["text"]
    top_only = await gen(max_tokens=12, temperature=1.0, seed=5, min_p=1.0)
    assert top_only["text"] == plain["text"]  # min_p 1 keeps only the most likely token: greedy
