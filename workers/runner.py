"""Running one request on the engine, whoever brought it (NATS or HTTP): prompt, grammar, cancel, answer."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from . import protocol as p
from .engine import Engine
from .formats import PromptFormat, format_prompt
from .generation import Expired
from .grammars import GrammarStore
from .outcome import RunFacts

MAX_REMEMBERED_CANCELS = 10_000
CANCEL_MEMORY_S = 3600.0

Request = p.InferenceRequest | p.EmbeddingRequest
Response = p.InferenceResponse | p.EmbeddingResponse


@dataclass(frozen=True)
class Execution:
    """A request's answer and what running it produced (for the log and the metrics)."""

    body: Response
    facts: RunFacts


class Runner:
    """Executes requests and keeps track of which ones are running, so they can be cancelled."""

    def __init__(self, *, model_name: str, worker_id: str, engine: Engine, fmt: PromptFormat | None,
                 grammars: GrammarStore | None, sampling: Mapping[str, float] | None = None) -> None:
        self.model_name, self.worker_id = model_name, worker_id
        self.engine = engine
        self.fmt = fmt  # None for kinds that do not generate text
        self.grammars = grammars
        self.sampling = dict(sampling or {})  # the worker's defaults for parameters a request leaves out
        self.running: dict[str, tuple[threading.Event, str | None]] = {}  # req_id -> (stop, owner)
        # queued requests someone cancelled: req_id -> (when, owner the cancel came from; None: anyone's)
        self._cancelled: OrderedDict[str, tuple[float, str | None]] = OrderedDict()

    # --- cancel --------------------------------------------------------------------

    def cancel(self, req_id: str, owner: str | None = None) -> str:
        """Stop `req_id` if it runs here ("running"); otherwise remember it so it is skipped when pulled
        ("queued"). With an `owner`, only a request whose reply inbox belongs to that owner is stopped
        ("refused" when the running one belongs to someone else)."""
        running = self.running.get(req_id)
        if running is not None:
            stop, running_owner = running
            if owner is not None and owner != running_owner:
                return "refused"
            stop.set()
            return "running"
        self._cancelled[req_id] = (time.monotonic(), owner)
        self._cancelled.move_to_end(req_id)
        while len(self._cancelled) > MAX_REMEMBERED_CANCELS:
            self._cancelled.popitem(last=False)
        return "queued"

    def was_cancelled(self, req_id: str, owner: str | None = None) -> bool:
        """Whether a cancel for this request arrived while it was queued (from anyone, or from its owner)."""
        seen = self._cancelled.pop(req_id, None)
        if seen is None or time.monotonic() - seen[0] >= CANCEL_MEMORY_S:
            return False
        return seen[1] is None or seen[1] == owner

    # --- execute ---------------------------------------------------------------------

    async def execute(self, req: Request, req_id: str, *, queue_ms: float = 0.0, owner: str | None = None,
                      on_delta: Callable[[str], None] | None = None, deadline_ms: int | None = None) -> Execution:
        """Run the request (`owner`: whose reply inbox it answers, for owner-only cancels). Raises BadRequest for
        input the model refuses, and 504 `expired` when the caller's deadline (`deadline_ms`, epoch ms, as the
        Fleet-Deadline header) passes before the answer is complete: a late answer is discarded, not sent."""
        if isinstance(req, p.EmbeddingRequest):
            return await self._embed(req, req_id, queue_ms, deadline_ms)
        return await self._complete(req, req_id, queue_ms, owner, on_delta, deadline_ms)

    async def _embed(self, req: p.EmbeddingRequest, req_id: str, queue_ms: float,
                     deadline_ms: int | None) -> Execution:
        t0 = time.perf_counter()
        texts = req.texts()
        try:
            emb = await self.engine.embed(texts, deadline_ms=deadline_ms, label=req_id)
        except Expired as e:
            raise p.BadRequest("expired", f"the caller's deadline passed while embedding, after {e.done} of "
                               f"{len(texts)} inputs; the partial answer was discarded", status=504) from None
        dur = (time.perf_counter() - t0) * 1000
        body = p.EmbeddingResponse(
            data=[p.EmbeddingItem(embedding=v, index=i) for i, v in enumerate(emb.vectors)],
            model=req.model or self.model_name, usage=p.Usage(prompt_tokens=emb.tokens, total_tokens=emb.tokens),
            req_id=req_id, duration_ms=round(dur, 2), queue_ms=queue_ms, worker_id=self.worker_id,
        )
        facts = RunFacts(tokens_in=emb.tokens, dur_ms=dur, finish_reason="stop", batch_id=emb.batch_id,
                         response_text=f"{len(emb.vectors)} vector(s) of {len(emb.vectors[0])}")
        return Execution(body, facts)

    async def _complete(self, req: p.InferenceRequest, req_id: str, queue_ms: float, owner: str | None,
                        on_delta: Callable[[str], None] | None, deadline_ms: int | None) -> Execution:
        if self.fmt is None:
            raise p.BadRequest("wrong_model_kind", f"{self.model_name} does not generate text", status=404)
        t0 = time.perf_counter()
        prompt = format_prompt(req, self.fmt)
        unset = {k: v for k, v in self.sampling.items() if getattr(req.params, k) is None}
        params = req.params.model_copy(update=unset) if unset else req.params
        grammar = (await self.grammars.resolve(req.params.grammar)
                   if (req.params.grammar and self.grammars) else None)
        cancel = threading.Event()
        self.running[req_id] = (cancel, owner)
        if self.was_cancelled(req_id, owner):  # a cancel that came while the grammar resolved: it stops at once
            cancel.set()
        try:
            out = await self.engine.complete(prompt, params, stop=self.fmt.stop, grammar=grammar,
                                             on_delta=on_delta, cancel=cancel, deadline_ms=deadline_ms,
                                             label=req_id)
        except Expired as e:
            raise p.BadRequest("expired", f"the caller's deadline passed while generating, after {e.done} tokens; "
                               "the partial answer was discarded", status=504) from None
        finally:
            self.running.pop(req_id, None)
        text, reasoning = (out.text, None) if req.raw else self.fmt.parse(out.text)
        dur = (time.perf_counter() - t0) * 1000
        body = p.InferenceResponse(
            req_id=req_id, model=self.model_name, text=text, tokens_in=out.tokens_in, tokens_out=out.tokens_out,
            cached_tokens=out.cached_tokens, finish_reason=out.finish_reason, duration_ms=round(dur, 2),
            queue_ms=queue_ms, worker_id=self.worker_id,
            reasoning=reasoning,
        )
        facts = RunFacts(
            formatted_input=prompt, params_json=params.model_dump_json(exclude_none=True),
            grammar=req.params.grammar, response_text=text if reasoning is None else f"{text}\n[reasoning] {reasoning}",
            tokens_in=out.tokens_in, tokens_out=out.tokens_out, ttft_ms=out.ttft_ms, dur_ms=dur,
            finish_reason=out.finish_reason, cached_tokens=out.cached_tokens,
        )
        return Execution(body, facts)


class DeltaPump:
    """Carries text pieces from the generation thread to an async publisher, in order."""

    def __init__(self, publish: Callable[[int, str], Awaitable[None]]) -> None:
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
