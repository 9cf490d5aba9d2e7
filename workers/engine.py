"""llama-cpp-python behind an async interface.

`WORKER_CONCURRENCY` contexts over one model file (the weights are mmapped, so the
page cache holds them once); each request borrows a context for its whole run. Every
llama.cpp call runs in a thread so the event loop (heartbeats, health, acks) keeps its rhythm.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .protocol import BadRequest, Params

if TYPE_CHECKING:
    from llama_cpp import Llama

POOLING = {"none": 0, "mean": 1, "cls": 2, "last": 3}


@dataclass
class Completion:
    text: str
    tokens_in: int
    tokens_out: int
    finish_reason: str
    ttft_ms: float | None


@dataclass
class Embeddings:
    vectors: list[list[float]]
    tokens: int


class Engine:
    """A pool of llama.cpp contexts for one model."""

    def __init__(self, path: Path, *, kind: str, concurrency: int, ctx_size: int, threads: int,
                 pooling: str = "mean", default_max_tokens: int = 128, default_stop: list[str] | None = None) -> None:
        self.path = path
        self.kind = kind
        self.concurrency = concurrency
        self.ctx_size = ctx_size
        self.threads = threads
        self.pooling = pooling
        self.default_max_tokens = default_max_tokens
        self.default_stop = default_stop or []
        self._free: asyncio.Queue[Llama] = asyncio.Queue()
        self._contexts: list[Llama] = []
        self.load_seconds = 0.0
        self._abort = threading.Event()

    def _new_context(self) -> Llama:
        from llama_cpp import Llama

        kwargs: dict[str, Any] = dict(
            model_path=str(self.path), n_ctx=self.ctx_size, n_threads=self.threads,
            n_threads_batch=self.threads, verbose=False,
        )
        if self.kind == "embedding":
            kwargs.update(embedding=True, pooling_type=POOLING[self.pooling], n_batch=self.ctx_size,
                          n_ubatch=self.ctx_size)
        return Llama(**kwargs)

    async def load(self, on_progress: Callable[[int, int], None] | None = None) -> None:
        """Create every context (blocking work in a thread)."""
        t0 = time.perf_counter()
        for i in range(self.concurrency):
            llm = await asyncio.to_thread(self._new_context)
            self._contexts.append(llm)
            self._free.put_nowait(llm)
            if on_progress:
                on_progress(i + 1, self.concurrency)
        self.load_seconds = time.perf_counter() - t0

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self._contexts[0].metadata) if self._contexts else {}

    @property
    def n_params(self) -> int | None:
        return int(self._contexts[0]._model.n_params()) if self._contexts else None

    def abort(self) -> None:
        """Stop every running generation within a token (used when a drain runs out of time)."""
        self._abort.set()

    @property
    def busy(self) -> int:
        return len(self._contexts) - self._free.qsize()

    def close(self) -> None:
        for llm in self._contexts:
            llm.close()
        self._contexts.clear()

    async def complete(self, prompt: str, params: Params, on_progress: Callable[[], None] | None = None) -> Completion:
        llm = await self._free.get()
        try:
            return await asyncio.to_thread(self._complete, llm, prompt, params, on_progress)
        finally:
            self._free.put_nowait(llm)

    def _complete(self, llm: Llama, prompt: str, p: Params, on_progress: Callable[[], None] | None) -> Completion:
        from llama_cpp import StoppingCriteriaList

        tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)
        room = self.ctx_size - len(tokens)
        if room < 1:
            raise BadRequest("context_overflow", f"prompt is {len(tokens)} tokens but the context holds "
                             f"{self.ctx_size}; shorten the input or raise CTX_SIZE")
        max_tokens = min(p.max_tokens or self.default_max_tokens, room)
        t0 = time.perf_counter()
        first: list[float] = []
        produced = [0]

        def count(_ids: Any, _logits: Any) -> bool:
            if not first:
                first.append(time.perf_counter())
            produced[0] += 1
            if on_progress:
                on_progress()
            return self._abort.is_set()

        out: Any = llm.create_completion(
            tokens,
            max_tokens=max_tokens,
            temperature=p.temperature if p.temperature is not None else 0.8,
            top_p=p.top_p if p.top_p is not None else 0.95,
            top_k=p.top_k if p.top_k is not None else 40,
            repeat_penalty=p.repeat_penalty if p.repeat_penalty is not None else 1.0,
            stop=(p.stop if p.stop is not None else []) + self.default_stop,
            seed=p.seed if p.seed is not None else random.getrandbits(31),  # else llama chains seeds
            stopping_criteria=StoppingCriteriaList([count]),
        )
        choice = out["choices"][0]
        usage = out["usage"]
        finish = "length" if choice["finish_reason"] == "length" else "stop"
        return Completion(
            text=choice["text"],
            tokens_in=usage["prompt_tokens"],
            tokens_out=usage["completion_tokens"],
            finish_reason=finish,
            ttft_ms=(first[0] - t0) * 1000 if first else None,
        )

    async def embed(self, texts: list[str]) -> Embeddings:
        llm = await self._free.get()
        try:
            return await asyncio.to_thread(self._embed, llm, texts)
        finally:
            self._free.put_nowait(llm)

    def _embed(self, llm: Llama, texts: list[str]) -> Embeddings:
        vectors: list[list[float]] = []
        total = 0
        for i, text in enumerate(texts):
            if self._abort.is_set():
                raise RuntimeError("aborted")
            n = len(llm.tokenize(text.encode(), add_bos=True, special=False))
            if n > self.ctx_size:
                raise BadRequest("context_overflow", f"input[{i}] is {n} tokens but the context holds "
                                 f"{self.ctx_size}; split the text or raise CTX_SIZE")
            vectors.append(list(llm.embed(text)))  # type: ignore[arg-type]
            total += n
        return Embeddings(vectors=vectors, tokens=total)
