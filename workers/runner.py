"""Running one request on the engine, whoever brought it (NATS or HTTP): prompt, grammar, cancel, answer."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from . import protocol as p
from .config import Settings
from .engine import Engine
from .grammars import GrammarStore
from .prompts import Harmony, Renderer, Template, format_prompt, parse_harmony

MAX_REMEMBERED_CANCELS = 10_000
CANCEL_MEMORY_S = 3600.0


class Runner:
    """Executes requests and keeps track of which ones are running, so they can be cancelled."""

    def __init__(self, settings: Settings, engine: Engine, formatter: Template | Renderer | None,
                 grammars: GrammarStore | None) -> None:
        self.settings = settings
        self.engine = engine
        self.formatter = formatter
        self.grammars = grammars
        self.running: dict[str, threading.Event] = {}
        self._cancelled: OrderedDict[str, float] = OrderedDict()  # queued requests whose caller cancelled

    # --- cancel --------------------------------------------------------------------

    def cancel(self, req_id: str) -> str:
        """Stop `req_id` if it runs here ("running"); otherwise remember it so it is skipped when pulled."""
        event = self.running.get(req_id)
        if event is not None:
            event.set()
            return "running"
        self._cancelled[req_id] = time.monotonic()
        self._cancelled.move_to_end(req_id)
        while len(self._cancelled) > MAX_REMEMBERED_CANCELS:
            self._cancelled.popitem(last=False)
        return "queued"

    def was_cancelled(self, req_id: str) -> bool:
        seen = self._cancelled.pop(req_id, None)
        return seen is not None and time.monotonic() - seen < CANCEL_MEMORY_S

    # --- execute ---------------------------------------------------------------------

    async def execute(self, req: p.InferenceRequest | p.EmbeddingRequest, req_id: str, row: dict[str, Any],
                      on_delta: Callable[[str], None] | None = None) -> p.InferenceResponse | p.EmbeddingResponse:
        """Run the request; fills `row` (the log row) as it goes. Raises BadRequest for input the model refuses."""
        s = self.settings
        t0 = time.perf_counter()
        if isinstance(req, p.EmbeddingRequest):
            emb = await self.engine.embed(req.texts())
            dur = (time.perf_counter() - t0) * 1000
            row.update(tokens_in=emb.tokens, dur_ms=dur, finish_reason="stop",
                       response_text=f"{len(emb.vectors)} vector(s) of {len(emb.vectors[0])}")
            return p.EmbeddingResponse(
                data=[p.EmbeddingItem(embedding=v, index=i) for i, v in enumerate(emb.vectors)],
                model=req.model or s.model_name, usage=p.Usage(prompt_tokens=emb.tokens, total_tokens=emb.tokens),
                req_id=req_id, duration_ms=round(dur, 2), queue_ms=row.get("queue_ms", 0.0), worker_id=s.worker_id,
            )
        prompt = format_prompt(req, self.formatter)
        grammar = self.grammars.resolve(req.params.grammar) if (req.params.grammar and self.grammars) else None
        row.update(formatted_input=prompt, params_json=req.params.model_dump_json(exclude_none=True),
                   grammar=req.params.grammar)
        cancel = threading.Event()
        self.running[req_id] = cancel
        try:
            out = await self.engine.complete(prompt, req.params, grammar=grammar, on_delta=on_delta, cancel=cancel)
        finally:
            self.running.pop(req_id, None)
        text, reasoning = out.text, None
        if isinstance(self.formatter, Harmony) and not req.raw:
            text, reasoning = parse_harmony(out.text)
        dur = (time.perf_counter() - t0) * 1000
        row.update(response_text=text if reasoning is None else f"{text}\n[reasoning] {reasoning}",
                   tokens_in=out.tokens_in, tokens_out=out.tokens_out, ttft_ms=out.ttft_ms, dur_ms=dur,
                   finish_reason=out.finish_reason)
        return p.InferenceResponse(
            req_id=req_id, model=s.model_name, text=text, tokens_in=out.tokens_in, tokens_out=out.tokens_out,
            finish_reason=out.finish_reason,  # type: ignore[arg-type]
            duration_ms=round(dur, 2), queue_ms=row.get("queue_ms", 0.0), worker_id=s.worker_id, reasoning=reasoning,
        )


class DeltaPump:
    """Carries text pieces from the generation thread to an async publisher, in order."""

    def __init__(self, publish: Callable[[int, str], Any]) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._publish = publish
        self._task = asyncio.create_task(self._run())
        self.count = 0

    def push(self, delta: str) -> None:  # called from the generation thread
        self._loop.call_soon_threadsafe(self._queue.put_nowait, delta)

    async def _run(self) -> None:
        while (delta := await self._queue.get()) is not None:
            await self._publish(self.count, delta)
            self.count += 1

    async def close(self) -> None:
        """Wait until every pushed piece has been published."""
        self._loop.call_soon(self._queue.put_nowait, None)  # queued behind pieces the thread already sent
        await self._task
