"""MODEL_FORMAT=harmony through a real worker: the prompt it builds, and the answer split into `text` (the `final`
channel) and `reasoning` (the `analysis` channel) over NATS, in the SQLite row and as OpenAI's `reasoning_content`.

No model shipped here speaks harmony (gpt-oss-20b is too big for this machine), so smollm2-135m writes the channels
under a GBNF grammar: real tokens from a real model, parsed by the worker as a gpt-oss answer would be (smollm2, not
gemma: a grammar is checked against the whole vocabulary each token, 49k tokens here, 262k in gemma). What this does
not cover: a model choosing its channels itself, their special tokens (`<|channel|>` is one token in gpt-oss's
vocabulary, several pieces of text in smollm2's), and streamed answers."""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
import time

import httpx
import pytest

from workers.config import Settings
from workers.formats.harmony import Harmony
from workers.ops import broker
from workers.protocol import ChatMessage

from .conftest import SMOLLM2_ENV, ask

pytestmark = pytest.mark.model

SUBJECT = "inference.request.smollm2-135m"
# analysis first, then the final channel, as gpt-oss writes them. The model picks the words among a few (a small
# grammar keeps sampling quick), and every choice ends the answer.
CHANNELS = (
    'root ::= "<|channel|>analysis<|message|>" thought "<|end|><|start|>assistant<|channel|>final<|message|>" answer\n'
    'thought ::= ("The user asks for a colour" | "A colour is wanted" | "Any colour will do") "."\n'
    'answer ::= ("Red" | "Blue" | "Green" | "Yellow") "."\n'
)
MESSAGES = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Name a colour. hm1"}]


def split(reply: dict) -> tuple[str, str]:
    return reply["text"], reply["reasoning"]


def check_split(text: str, reasoning: str) -> None:
    """Both channels, each whole and without markup: the grammar's shapes, read back by the worker."""
    assert reasoning and reasoning.endswith(".") and "<|" not in reasoning, reasoning
    assert text and text.endswith(".") and "<|" not in text and text not in reasoning, text


async def test_harmony_prompt_and_channels_through_a_worker(start_worker, nc, smollm2_path):
    port = broker.free_port()
    w = await start_worker(SMOLLM2_ENV, MODEL_PATH=smollm2_path, MODEL_FORMAT="harmony",
                           HARMONY_IDENTITY="You are Fleet.", HARMONY_REASONING="low", HTTP_ADDR=f"127.0.0.1:{port}")
    body = {"req_id": "hm1", "messages": MESSAGES, "params": {"grammar": CHANNELS, "max_tokens": 200,
                                                              "temperature": 0}}
    reply = await ask(nc, SUBJECT, body, timeout=120)
    assert reply["finish_reason"] == "stop", reply  # ended by the grammar, not cut off
    text, reasoning = split(reply)
    check_split(text, reasoning)

    # the prompt is the harmony format's own rendering, with this worker's settings and today's date
    settings = Settings(model_name="smollm2-135m", harmony_identity="You are Fleet.", harmony_reasoning="low")
    expected = Harmony(settings.harmony_identity, settings.harmony_knowledge_cutoff, "low",
                       today=dt.date.today).render([ChatMessage(**m) for m in MESSAGES])
    deadline = time.monotonic() + 10
    row = None
    while row is None and time.monotonic() < deadline:  # the store writes late
        if w.db.exists():
            with sqlite3.connect(w.db) as db:
                row = db.execute("SELECT formatted_input, response_text FROM requests WHERE req_id = 'hm1'").fetchone()
        await asyncio.sleep(0.1)
    assert row is not None
    assert row[0] == expected and "<|start|>developer<|message|># Instructions\n\nAnswer in one word.<|end|>" in row[0]
    assert row[1] == f"{text}\n[reasoning] {reasoning}"

    # the OpenAI chat route hands the analysis channel back as reasoning_content
    async with httpx.AsyncClient(timeout=120) as http:
        r = await http.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                            json={"model": "smollm2-135m", "messages": MESSAGES, "grammar": CHANNELS,
                                  "max_tokens": 200, "temperature": 0})
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    check_split(message["content"], message["reasoning_content"])


async def test_harmony_without_a_final_channel_is_no_answer_yet_and_raw_skips_parsing(start_worker, nc,
                                                                                     smollm2_path):
    """Cut off while thinking (a grammar that never leaves the analysis channel): no answer, the reasoning so far;
    a raw request gets the model's text untouched."""
    await start_worker(SMOLLM2_ENV, MODEL_PATH=smollm2_path, MODEL_FORMAT="harmony")
    thinking = 'root ::= "<|channel|>analysis<|message|>Thinking" (" more" | " and" | " then")*\n'
    cut = await ask(nc, SUBJECT, {"messages": MESSAGES, "params": {"grammar": thinking, "max_tokens": 40}},
                    timeout=120)
    assert cut["text"] == "" and cut["reasoning"].startswith("Thinking") and "<|" not in cut["reasoning"], cut
    params = {"grammar": CHANNELS, "max_tokens": 200, "temperature": 0}
    raw = await ask(nc, SUBJECT, {"input": "Name a colour.", "raw": True, "params": params}, timeout=120)
    assert raw["text"].startswith("<|channel|>analysis<|message|>") and "<|channel|>final<|message|>" in raw["text"]
    assert raw.get("reasoning") is None
