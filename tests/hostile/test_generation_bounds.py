"""One request cannot hold a worker unboundedly (issue 13): a `max_tokens` beyond the context is refused before any
decoding, the caller's deadline stops a running generation (504 `expired`, logged, no partial text), and an
embeddings request over the token cap is refused before any embedding work.

Real worker processes with the real model over a real nats-server.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from tests.conftest import EMBED_ENV, ask

pytestmark = pytest.mark.model
GEMMA = "inference.request.gemma3-270m"
EMBED = "embedding.request.gemma3-270m-embed"
CTX = 1024
# At least 800 characters: no end-of-generation token before them, so the answer takes far longer than its deadline.
LONG_ANSWER = "root ::= [a-z ]{800}"


async def _timed(nc, subject: str, body: dict, timeout: float = 30) -> tuple[dict, float]:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    reply = await ask(nc, subject, body, timeout=timeout)
    return reply, time.monotonic() - t0


async def _row(db: Path, req_id: str, timeout: float = 10) -> tuple[str, str | None, str | None]:
    """(status, response_text, error) of the request's log row, once the background writer has stored it."""
    deadline = time.monotonic() + timeout
    while True:
        with sqlite3.connect(db) as con:
            row = con.execute("SELECT status, response_text, error FROM requests WHERE req_id = ?",
                              (req_id,)).fetchone()
        if row is not None:
            return row
        assert time.monotonic() < deadline, f"no log row for {req_id}"
        await asyncio.sleep(0.05)


async def test_max_tokens_beyond_the_context_is_refused_at_once_and_the_default_still_fits(start_worker, nc):
    ctx = 512
    await start_worker(CTX_SIZE=ctx)
    huge, took = await _timed(nc, GEMMA, {"input": "hi", "params": {"max_tokens": 10**12}})
    assert (huge["error"]["code"], huge["error"]["type"]) == (400, "context_overflow") and took < 1.0, (huge, took)
    # Within MAX_TOKENS_LIMIT (the context) alone, but not with the prompt: refused before decoding, not cut short.
    over, took = await _timed(nc, GEMMA, {"input": "Tell me about the sea.", "params": {"max_tokens": ctx - 4}})
    assert (over["error"]["code"], over["error"]["type"]) == (400, "context_overflow") and took < 1.0, (over, took)
    assert "max_tokens" in over["error"]["message"] and "CTX_SIZE" in over["error"]["message"]
    # Not asked for: the default is clamped to the room the prompt leaves, as before.
    fits = await ask(nc, GEMMA, {"input": "sea " * (ctx - 30), "params": {"temperature": 0}})
    assert not fits.get("error") and fits["tokens_in"] + fits["tokens_out"] <= ctx, fits


async def test_a_generation_past_its_deadline_stops_answers_504_expired_and_is_logged(start_worker, nc):
    w = await start_worker(CTX_SIZE=CTX)
    body = {"req_id": "late-1", "input": "Write a long story about the sea.", "timeout_ms": 1500,
            "params": {"max_tokens": 900, "grammar": LONG_ANSWER, "temperature": 0}}
    late, took = await _timed(nc, GEMMA, body)
    err = late["error"]
    assert (err["code"], err["type"]) == (504, "expired"), late
    assert "while generating" in err["message"] and "after 0 tokens" not in err["message"], err  # it was running
    assert not late.get("text") and took < 6.0, (late, took)  # stopped within a token, the partial text dropped
    status, text, error = await _row(w.db, "late-1")
    assert status == "expired" and not text and error and error.startswith("504 expired"), (status, text, error)
    ok = await ask(nc, GEMMA, {"input": "Say hi.", "params": {"max_tokens": 4, "temperature": 0}})
    assert not ok.get("error"), ok  # the context was given back


async def test_embeddings_over_the_token_cap_are_refused_before_any_embedding(start_worker, nc):
    await start_worker(EMBED_ENV, CTX_SIZE=256)  # the cap: 64 × CTX_SIZE = 16,384 tokens per request
    texts = ["the quick brown fox jumps over the lazy dog by the sea"] * 2000  # about 26,000 tokens
    refused, took = await _timed(nc, EMBED, {"input": texts})
    assert (refused["error"]["code"], refused["error"]["type"]) == (400, "too_many_tokens"), refused
    assert "16384" in refused["error"]["message"] and took < 3.0, (refused, took)
    ok = await ask(nc, EMBED, {"input": texts[:4]})
    assert not ok.get("error") and len(ok["data"]) == 4
