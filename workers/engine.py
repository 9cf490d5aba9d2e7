"""llama-cpp-python behind an async interface.

Generation: `WORKER_CONCURRENCY` contexts over one model file (the weights are mmapped, so the
page cache holds them once); each request borrows a context for its whole run. Embeddings: one
context, and requests that wait at the same time embedded together (workers/embed_batch.py). Every
llama.cpp call runs in a thread so the event loop (heartbeats, health, acks) keeps its rhythm.
A request's work is bounded before it starts (max_tokens within the context, the embedding token cap)
and while it runs (the caller's deadline, checked every token and before each embedding decode).
"""

from __future__ import annotations

import asyncio
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from . import sampling
from .embed_batch import EmbedBatcher
from .generation import Completion, Embeddings, Expired, token_budget
from .protocol import FinishReason, Params, SlotRequest, SlotUsage, now_ms

if TYPE_CHECKING:
    from llama_cpp import Llama

    from .batching import Scheduler

_GRAMMAR_LOCK = threading.Lock()
_GRAMMAR_LOG = re.compile(r"^.*grammar", re.MULTILINE)  # where llama.cpp's message (and the source) starts
POOLING = {"none": 0, "mean": 1, "cls": 2, "last": 3}


@dataclass
class _Run:
    """A request in the per-context engine or the embedding batcher, for the slot view (written by the thread
    that runs it, read by health: plain fields, no lock)."""

    label: str | None
    state: Literal["waiting", "prefill", "decode"] = "waiting"
    slot: int | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    started: float = field(default_factory=time.perf_counter)

    def view(self, now: float) -> SlotRequest:
        return SlotRequest(req_id=self.label or "", state=self.state, slot=self.slot, tokens_in=self.tokens_in,
                           tokens_out=self.tokens_out, elapsed_ms=round((now - self.started) * 1000, 1))


class Engine:
    """A pool of llama.cpp contexts for one model."""

    def __init__(self, path: Path, *, embedding: bool, concurrency: int, ctx_size: int, threads: int,
                 pooling: str = "mean", default_max_tokens: int = 128, normalize: bool = False,
                 embed_max_tokens: int = 0, n_gpu_layers: int = 0, flash_attn: bool = False, main_gpu: int = 0,
                 tensor_split: tuple[float, ...] = (), batched: bool = False, embed_batch_max: int = 16,
                 kv_tokens: int = 0) -> None:
        self.path = path
        self.normalize = normalize  # L2-normalise embeddings (sentence-transformers models expect it)
        self.embedding = embedding  # pooled vectors instead of text generation
        self.concurrency = concurrency
        self.ctx_size = ctx_size
        self.threads = threads
        self.pooling = pooling
        self.default_max_tokens = default_max_tokens
        self.embed_max_tokens = embed_max_tokens or 64 * ctx_size  # over all inputs of one request
        self.embed_batch_max = embed_batch_max  # requests embedded together in one decode (EMBED_BATCH_MAX)
        # GPU offload (ignored by a CPU build of llama.cpp); the defaults are llama-cpp-python's, so CPU as before
        self.n_gpu_layers = n_gpu_layers  # -1: all
        self.flash_attn = flash_attn
        self.main_gpu = main_gpu
        self.tensor_split = tensor_split  # (): not split by us
        # ENGINE=batched: generations go to one Scheduler (workers/batching.py) decoding `concurrency` sequences
        # together; the pool keeps one context for what is not a generation (model facts, grammar checks)
        self.batched = batched and not embedding
        self.kv_tokens = kv_tokens  # batched: the shared KV cache (KV_CACHE_TOKENS); 0: ctx_size × concurrency
        self._scheduler: Scheduler | None = None
        self._batcher: EmbedBatcher | None = None
        self._free: asyncio.Queue[Llama] = asyncio.Queue()
        self._contexts: list[Llama] = []
        self.load_seconds = 0.0
        self._abort = threading.Event()
        self._runs: dict[int, _Run] = {}  # id -> a request running here (not the scheduler's: it has its own)

    def _new_context(self) -> Llama:
        from llama_cpp import Llama

        kwargs: dict[str, Any] = dict(
            # batched: this context only answers for the model (metadata, vocabulary, grammar checks); the
            # scheduler decodes on its own context of the same loaded model
            model_path=str(self.path), n_ctx=256 if self.batched else self.ctx_size, n_threads=self.threads,
            n_threads_batch=self.threads, verbose=False, n_gpu_layers=self.n_gpu_layers,
            flash_attn=self.flash_attn, main_gpu=self.main_gpu, tensor_split=list(self.tensor_split) or None,
        )
        if self.embedding:
            kwargs.update(embedding=True, pooling_type=POOLING[self.pooling], n_batch=self.ctx_size,
                          n_ubatch=self.ctx_size)
        return Llama(**kwargs)

    async def load(self, on_progress: Callable[[int, int], None] | None = None) -> None:
        """Create every context (blocking work in a thread)."""
        t0 = time.perf_counter()
        contexts = 1 if self.batched or self.embedding else self.concurrency
        for i in range(contexts):
            llm = await asyncio.to_thread(self._new_context)
            self._contexts.append(llm)
            self._free.put_nowait(llm)
            if on_progress:
                on_progress(i + 1, contexts)
        if self.batched:
            from .batching import Scheduler

            self._scheduler = Scheduler(self.path, slots=self.concurrency, ctx_size=self.ctx_size,
                                        threads=self.threads, default_max_tokens=self.default_max_tokens,
                                        kv_tokens=self.kv_tokens, model=self._contexts[0]._model.model,
                                        flash_attn=True if self.flash_attn else None)
            await self._scheduler.load()
        if self.embedding:
            self._batcher = EmbedBatcher(self._contexts[0], max_requests=self.embed_batch_max,
                                         max_tokens=self.embed_max_tokens, normalize=self.normalize,
                                         abort=self._abort, pooling=POOLING[self.pooling],
                                         threads=self.threads, flash_attn=self.flash_attn)
        self.load_seconds = time.perf_counter() - t0

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self._contexts[0].metadata) if self._contexts else {}

    @property
    def n_params(self) -> int | None:
        return int(self._contexts[0]._model.n_params()) if self._contexts else None

    def special_tokens(self) -> dict[str, str]:
        """The model's begin- and end-of-sequence tokens as text ({"bos": ..., "eos": ...})."""
        if not self._contexts:
            return {}
        llm = self._contexts[0]
        return {name: llm.detokenize([token], special=True).decode(errors="ignore")
                for name, token in (("bos", llm.token_bos()), ("eos", llm.token_eos()))}

    def check_grammar(self, text: str) -> str | None:
        """Compile a GBNF grammar with llama.cpp; the parser's message if it fails, else None."""
        import os
        import sys
        import tempfile

        import llama_cpp

        vocab = self._contexts[0]._model.vocab
        # llama.cpp's parser prints its reason on the C stderr: catch file descriptor 2 for the call.
        with _GRAMMAR_LOCK, tempfile.TemporaryFile() as captured:
            sys.stderr.flush()
            saved = os.dup(2)
            os.dup2(captured.fileno(), 2)
            try:
                sampler = llama_cpp.llama_sampler_init_grammar(vocab, text.encode(), b"root")
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            captured.seek(0)
            log = captured.read().decode(errors="replace")
        # This runs in a thread: what the rest of the process printed before llama.cpp's message goes back.
        found = _GRAMMAR_LOG.search(log)
        if others := log[:found.start() if found else len(log)]:
            os.write(2, others.encode(errors="replace"))
        ours = log[found.start():].splitlines() if found else []
        if sampler:
            llama_cpp.llama_sampler_free(sampler)
            return None
        lines = [ln.strip() for ln in ours if ln.strip() and "failed to parse grammar" not in ln]
        return "; ".join(lines[:2])[:300] or ("llama.cpp refused the grammar without a reason: check that it has a "
                                              "`root` rule and that no rule starts with itself (left recursion)")

    def abort(self) -> None:
        """Stop every running generation within a token (used when a drain runs out of time)."""
        self._abort.set()
        if self._scheduler is not None:
            self._scheduler.abort()

    @property
    def busy(self) -> int:
        if self._scheduler is not None:
            return self._scheduler.busy
        if self._batcher is not None:
            return self._batcher.busy
        return len(self._contexts) - self._free.qsize()

    def usage(self) -> SlotUsage:
        """What the engine holds now: the scheduler's slots and KV cache, or the contexts in use."""
        if self._scheduler is not None:
            return self._scheduler.usage()
        slots = self.embed_batch_max if self._batcher is not None else self.concurrency
        now = time.perf_counter()
        runs = sorted(list(self._runs.values()), key=lambda r: r.started)
        return SlotUsage(slots=slots, busy=self.busy, waiting=sum(r.state == "waiting" for r in runs),
                         requests=[r.view(now) for r in runs])

    def close(self) -> None:
        if self._batcher is not None:
            self._batcher.close()
        self._batcher = None
        if self._scheduler is not None:
            self._scheduler.close()
            self._scheduler = None
        for llm in self._contexts:
            llm.close()
        self._contexts.clear()

    async def complete(self, prompt: str, params: Params, *, stop: tuple[str, ...] = (), grammar: str | None = None,
                       on_delta: Callable[[str], None] | None = None, cancel: threading.Event | None = None,
                       deadline_ms: int | None = None, label: str | None = None) -> Completion:
        """Generate from `prompt`, ending at the caller's stop strings or `stop` (the prompt format's).
        `on_delta` gets text pieces as they are produced (called from the generation thread); setting
        `cancel` stops within a token with finish_reason `cancelled`. Past `deadline_ms` (epoch ms) it stops
        within a token and raises Expired. `label` (the req_id) names it in `usage()`."""
        if self._scheduler is not None:
            return await self._scheduler.complete(prompt, params, stop=stop, grammar=grammar, on_delta=on_delta,
                                                  cancel=cancel, deadline_ms=deadline_ms, label=label)
        run = _Run(label)
        self._runs[id(run)] = run
        try:
            llm = await self._borrow(deadline_ms)
            try:
                run.slot, run.state = self._contexts.index(llm), "prefill"
                return await asyncio.to_thread(self._complete, llm, prompt, params, stop, grammar, on_delta, cancel,
                                               deadline_ms, run)
            finally:
                self._free.put_nowait(llm)
        finally:
            self._runs.pop(id(run), None)

    async def _borrow(self, deadline_ms: int | None) -> Llama:
        """A free context, waiting no longer than the deadline (Expired after it)."""
        if deadline_ms is None:
            return await self._free.get()
        try:
            return await asyncio.wait_for(self._free.get(), max(0.0, (deadline_ms - now_ms()) / 1000))
        except TimeoutError:
            raise Expired(0) from None

    def _complete(self, llm: Llama, prompt: str, p: Params, stop: tuple[str, ...], grammar: str | None,
                  on_delta: Callable[[str], None] | None, cancel: threading.Event | None,
                  deadline_ms: int | None, run: _Run | None = None) -> Completion:
        from llama_cpp import LlamaGrammar, StoppingCriteriaList, llama_vocab_is_eog

        tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)
        run = run or _Run(None)
        run.tokens_in = len(tokens)
        max_tokens = token_budget(len(tokens), p, self.ctx_size, self.default_max_tokens)
        sampling.check_logit_bias(p, llm.n_vocab())
        if deadline_ms is not None and now_ms() >= deadline_ms:
            raise Expired(0)
        t0 = time.perf_counter()
        first: list[float] = []
        sampled: list[int] = []
        stop_now = cancel or threading.Event()
        late = threading.Event()

        def watch(ids: Any, _logits: Any) -> bool:
            if not first:
                first.append(time.perf_counter())
                run.state = "decode"
            sampled.append(int(ids[-1]))
            run.tokens_out = len(sampled)
            if deadline_ms is not None and now_ms() >= deadline_ms:
                late.set()
            return stop_now.is_set() or self._abort.is_set() or late.is_set()

        chunks: Any = llm.create_completion(
            tokens,
            max_tokens=max_tokens,
            temperature=p.temperature if p.temperature is not None else sampling.TEMPERATURE,
            top_p=p.top_p if p.top_p is not None else sampling.TOP_P,
            top_k=p.top_k if p.top_k is not None else sampling.TOP_K,
            repeat_penalty=p.repeat_penalty if p.repeat_penalty is not None else sampling.REPEAT_PENALTY,
            min_p=p.min_p if p.min_p is not None else sampling.MIN_P,
            frequency_penalty=p.frequency_penalty or 0.0,
            presence_penalty=p.presence_penalty or 0.0,
            logit_bias=p.logit_bias,
            stop=[*(p.stop or []), *stop],
            seed=p.seed if p.seed is not None else random.getrandbits(31),  # else llama chains seeds
            stopping_criteria=StoppingCriteriaList([watch]),
            grammar=LlamaGrammar.from_string(grammar) if grammar else None,
            stream=True,  # llama-cpp-python holds back text that could start a stop string
        )
        parts: list[str] = []
        finish: FinishReason = "stop"
        for chunk in chunks:
            choice = chunk["choices"][0]
            if choice["text"]:
                parts.append(choice["text"])
                if on_delta:
                    on_delta(choice["text"])
            if choice.get("finish_reason"):
                finish = "length" if choice["finish_reason"] == "length" else "stop"
        if stop_now.is_set():
            finish = "cancelled"
        elif late.is_set():
            raise Expired(len(sampled))
        produced = min(len(sampled), max_tokens)
        if finish != "length" and sampled and llama_vocab_is_eog(llm._model.vocab, sampled[-1]):
            produced -= 1  # the end-of-generation token is not part of the answer
        return Completion(
            text="".join(parts), tokens_in=len(tokens), tokens_out=produced, finish_reason=finish,
            ttft_ms=(first[0] - t0) * 1000 if first else None,
        )

    async def embed(self, texts: list[str], deadline_ms: int | None = None, label: str | None = None) -> Embeddings:
        """One vector per text; every text is counted before any work. Past `deadline_ms` (epoch ms) it stops
        before its next decode and raises Expired. `label` (the req_id) names it in `usage()`."""
        if self._batcher is None:
            raise RuntimeError("embed() needs an engine loaded with embedding=True")
        run = _Run(label, state="prefill")  # the batcher does not say when its batch starts: counted as running
        self._runs[id(run)] = run
        try:
            return await self._batcher.embed(texts, deadline_ms)
        finally:
            self._runs.pop(id(run), None)
