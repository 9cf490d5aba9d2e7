"""Embedding requests that wait together are embedded together: one llama.cpp context, one decode per group.

Part of a decode's cost is the same however few texts it holds (the weights are read once for all of them),
so the requests that arrive while a decode runs go into the next one, each text its own sequence
(`Llama.embed` with a list), and every caller takes back only its own vectors. A request that finds the context
idle goes at once: nothing waits for company. A group holds up to EMBED_BATCH_MAX requests and up to
`EMBED_BATCH_TOKENS` tokens (an encoder attends across its whole batch, so bigger groups cost more than they save:
scripts/bench_embed.py measures it); a request with more texts than that is split over several decodes, taking
turns with the others so a big request does not hold up the small ones behind it.

Each request is checked on its own before it joins a line (every text counted, too long or too many tokens
refused), so one bad request never fails the others; its deadline and the worker's abort are checked before
each decode it takes part in.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .generation import Embeddings, Expired
from .protocol import BadRequest, now_ms

if TYPE_CHECKING:
    from llama_cpp import Llama

EMBED_BATCH_TOKENS = 64  # tokens per decode (best in scripts/bench_embed.py); a longer text still goes, alone
INLINE_CHARS = 4096  # a request this short is tokenized on the event loop: a thread hand-off costs more


@dataclass(eq=False)
class _Job:
    """One request in line: its texts, how far it got, and the caller waiting for it."""

    texts: list[str]
    tokens: list[list[int]]
    deadline_ms: int | None
    future: asyncio.Future[Embeddings]
    vectors: list[list[float]] = field(default_factory=list)
    batch_id: int | None = None  # the first decode that served it
    alone: bool = False  # a group it was in failed: it goes in groups of its own from now on

    @property
    def done(self) -> int:
        return len(self.vectors)


class _Context:
    """A llama.cpp embedding context of its own on the loaded model, fed token ids directly.

    `Llama.embed` tokenizes every text again (the batcher has the tokens from counting them) and copies and
    normalizes vectors in Python loops. Flash attention stays off unless FLASH_ATTN=on: on this CPU it makes a
    group of short texts about a fifth faster, but a text's vector then differs from its lone vector by up to
    1e-4 depending on its company (scripts/bench_embed.py)."""

    def __init__(self, llm: Llama, *, pooling: int, sequences: int, threads: int, flash_attn: bool) -> None:
        import llama_cpp as ll

        n_ctx = llm.n_ctx()
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = n_ctx
        cparams.n_seq_max = sequences
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.embeddings = True
        cparams.pooling_type = pooling
        cparams.kv_unified = True
        cparams.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else \
            ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self._ctx = ll.llama_init_from_model(llm._model.model, cparams)
        if not self._ctx:
            raise RuntimeError(f"llama.cpp could not create an embedding context of {n_ctx} tokens")
        self._batch = ll.llama_batch_init(n_ctx, 0, 1)
        self._mem = ll.llama_get_memory(self._ctx)
        self.n_embd = ll.llama_model_n_embd(llm._model.model)

    def embed(self, texts: list[list[int]], normalize: bool) -> list[list[float]]:
        """One pooled vector per token list; all of them in one llama_decode (they fit n_batch together)."""
        import llama_cpp as ll

        b, n = self._batch, 0
        for seq, tokens in enumerate(texts):
            for pos, token in enumerate(tokens):
                b.token[n], b.pos[n], b.n_seq_id[n], b.logits[n] = token, pos, 1, True
                b.seq_id[n][0] = seq
                n += 1
        b.n_tokens = n
        ll.llama_memory_clear(self._mem, True)
        rc = ll.llama_decode(self._ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc}) embedding {len(texts)} texts of {n} tokens")
        rows = np.array([np.ctypeslib.as_array(ll.llama_get_embeddings_seq(self._ctx, seq), shape=(self.n_embd,))
                         for seq in range(len(texts))], dtype=np.float64)
        if normalize:  # unit length (sentence-transformers' normalize), as llama-cpp-python's normalize_embedding
            norms = np.linalg.norm(rows, axis=1, keepdims=True)
            rows = np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)
        vectors: list[list[float]] = rows.tolist()
        return vectors

    def close(self) -> None:
        import llama_cpp as ll

        if self._ctx:
            ll.llama_batch_free(self._batch)
            ll.llama_free(self._ctx)
            self._ctx = None


class EmbedBatcher:
    """Runs every embedding request of one context, grouping those that wait at the same time."""

    def __init__(self, llm: Llama, *, max_requests: int, max_tokens: int, normalize: bool,
                 abort: threading.Event, batch_tokens: int = EMBED_BATCH_TOKENS, pooling: int = 1,
                 threads: int = 1, flash_attn: bool = False) -> None:
        self.llm = llm
        self.max_requests = max_requests  # EMBED_BATCH_MAX
        self.max_tokens = max_tokens  # EMBED_MAX_TOKENS: over all texts of one request
        self.normalize = normalize
        self.abort = abort
        # Learned position tables end at the trained context; past it llama.cpp aborts the process.
        self.limit = min(llm.n_ctx(), llm._model.n_ctx_train())
        self.batch_tokens = min(batch_tokens, llm.n_batch)
        self.max_texts = llm.context_params.n_seq_max  # one sequence per text, all in one decode
        # pooling "none" (a vector per token) stays with Llama.embed; pooled vectors use a context of our own
        self._ctx = _Context(llm, pooling=pooling, sequences=self.max_texts, threads=threads,
                                flash_attn=flash_attn) if pooling else None
        self._line: deque[_Job] = deque()
        self._ids = itertools.count(1)
        self._serving: asyncio.Task[None] | None = None

    @property
    def busy(self) -> int:
        """Requests waiting or being embedded (the context is in use while any is)."""
        return len(self._line)

    async def embed(self, texts: list[str], deadline_ms: int | None = None) -> Embeddings:
        """One vector per text; every text is counted before any work. Past `deadline_ms` (epoch ms) it stops
        before its next decode and raises Expired."""
        if not texts:
            return Embeddings(vectors=[], tokens=0)
        if sum(len(t) for t in texts) <= INLINE_CHARS:
            tokens = self._tokenize(texts)
        else:
            tokens = await asyncio.to_thread(self._tokenize, texts)
        if deadline_ms is not None and now_ms() >= deadline_ms:
            raise Expired(0)
        job = _Job(texts, tokens, deadline_ms, asyncio.get_running_loop().create_future())
        self._line.append(job)
        if self._serving is None or self._serving.done():
            self._serving = asyncio.create_task(self._serve(), name="embed-batches")
        return await job.future

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        """Each text's tokens; BadRequest for one too long or for too many in all (never truncated)."""
        out: list[list[int]] = []
        total = 0
        for i, t in enumerate(texts):
            tokens = self.llm.tokenize(t.encode(), add_bos=True, special=False)
            n = len(tokens)
            if n > self.limit:
                raise BadRequest("context_overflow", f"input[{i}] is {n} tokens but this model takes at most "
                                 f"{self.limit}; split the text into shorter pieces")
            out.append(tokens)
            total += n
            if total > self.max_tokens:  # stop counting here: the rest is not worth tokenizing
                raise BadRequest("too_many_tokens", f"the inputs hold more than {self.max_tokens} tokens "
                                 f"(EMBED_MAX_TOKENS; exceeded at input[{i}] of {len(texts)}); split them over "
                                 "several requests")
        return out

    async def _serve(self) -> None:
        """Decode groups until the line is empty; started by the request that finds nobody serving."""
        try:
            await self._serve_line()
        except Exception as e:  # a fault here must not leave the callers in line waiting for ever
            for job in list(self._line):
                self._fail(job, e)

    async def _serve_line(self) -> None:
        while self._line:
            if self.abort.is_set():  # a drain ran out of time: nothing more starts
                for job in list(self._line):
                    self._fail(job, RuntimeError("aborted"))
                return
            group = self._take()
            if not group:
                continue
            batch_id = next(self._ids)
            try:
                vectors = await asyncio.to_thread(self._decode, group)
            except Exception as e:
                if len(group) == 1:
                    self._fail(group[0][0], e)
                else:  # each request was checked alone: try them alone, so only the one at fault fails
                    for job, _, _ in group:
                        job.alone = True
                continue
            at = 0
            for job, start, end in group:
                job.vectors.extend(vectors[at : at + end - start])
                at += end - start
                if job.batch_id is None:
                    job.batch_id = batch_id
                self._line.remove(job)
                if job.future.done():  # the caller went away while it ran
                    continue
                if job.done == len(job.texts):
                    job.future.set_result(Embeddings(vectors=job.vectors, tokens=sum(map(len, job.tokens)),
                                                     batch_id=job.batch_id))
                else:
                    self._line.append(job)  # the rest after the others' turn

    def _take(self) -> list[tuple[_Job, int, int]]:
        """The next group, in line order: (request, first text, end) for each request in it. A request whose
        deadline passed leaves the line with Expired; one whose caller is gone just leaves."""
        now = now_ms()
        group: list[tuple[_Job, int, int]] = []
        tokens = texts = 0
        for job in list(self._line):
            if job.future.done():
                self._line.remove(job)
                continue
            if job.deadline_ms is not None and now >= job.deadline_ms:
                self._fail(job, Expired(job.done))
                continue
            if len(group) == self.max_requests or (group and group[0][0].alone):
                break
            if job.alone and group:
                continue
            start = end = job.done
            while end < len(job.texts):
                n = len(job.tokens[end])
                if (group or end > start) and (tokens + n > self.batch_tokens or texts == self.max_texts):
                    break
                tokens += n
                texts += 1
                end += 1
            if end > start:
                group.append((job, start, end))
        return group

    def _fail(self, job: _Job, error: BaseException) -> None:
        self._line.remove(job)
        if not job.future.done():
            job.future.set_exception(error)

    def _decode(self, group: list[tuple[_Job, int, int]]) -> list[list[float]]:
        # one decode: the group fits n_batch tokens and n_seq_max sequences
        if self._ctx is None:
            texts = [t for job, start, end in group for t in job.texts[start:end]]
            vectors: list[list[float]] = self.llm.embed(texts, normalize=self.normalize, truncate=False)
            return vectors
        return self._ctx.embed([t for job, start, end in group for t in job.tokens[start:end]], self.normalize)

    def close(self) -> None:
        if self._ctx is not None:
            self._ctx.close()
