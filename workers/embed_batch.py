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

from .generation import Embeddings, Expired
from .protocol import BadRequest, now_ms

if TYPE_CHECKING:
    from llama_cpp import Llama

EMBED_BATCH_TOKENS = 64  # tokens per decode (best in scripts/bench_embed.py); a longer text still goes, alone


@dataclass(eq=False)
class _Job:
    """One request in line: its texts, how far it got, and the caller waiting for it."""

    texts: list[str]
    counts: list[int]
    deadline_ms: int | None
    future: asyncio.Future[Embeddings]
    vectors: list[list[float]] = field(default_factory=list)
    batch_id: int | None = None  # the first decode that served it
    alone: bool = False  # a group it was in failed: it goes in groups of its own from now on

    @property
    def done(self) -> int:
        return len(self.vectors)


class EmbedBatcher:
    """Runs every embedding request of one context, grouping those that wait at the same time."""

    def __init__(self, llm: Llama, *, max_requests: int, max_tokens: int, normalize: bool,
                 abort: threading.Event, batch_tokens: int = EMBED_BATCH_TOKENS) -> None:
        self.llm = llm
        self.max_requests = max_requests  # EMBED_BATCH_MAX
        self.max_tokens = max_tokens  # EMBED_MAX_TOKENS: over all texts of one request
        self.normalize = normalize
        self.abort = abort
        # Learned position tables end at the trained context; past it llama.cpp aborts the process.
        self.limit = min(llm.n_ctx(), llm._model.n_ctx_train())
        self.batch_tokens = min(batch_tokens, llm.n_batch)
        self.max_texts = llm.context_params.n_seq_max  # one sequence per text, all in one decode
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
        counts = await asyncio.to_thread(self._count, texts)
        if deadline_ms is not None and now_ms() >= deadline_ms:
            raise Expired(0)
        job = _Job(texts, counts, deadline_ms, asyncio.get_running_loop().create_future())
        self._line.append(job)
        if self._serving is None or self._serving.done():
            self._serving = asyncio.create_task(self._serve(), name="embed-batches")
        return await job.future

    def _count(self, texts: list[str]) -> list[int]:
        """Tokens per text; BadRequest for one too long or for too many in all (never truncated)."""
        counts: list[int] = []
        total = 0
        for i, t in enumerate(texts):
            n = len(self.llm.tokenize(t.encode(), add_bos=True, special=False))
            if n > self.limit:
                raise BadRequest("context_overflow", f"input[{i}] is {n} tokens but this model takes at most "
                                 f"{self.limit}; split the text into shorter pieces")
            counts.append(n)
            total += n
            if total > self.max_tokens:  # stop counting here: the rest is not worth tokenizing
                raise BadRequest("too_many_tokens", f"the inputs hold more than {self.max_tokens} tokens "
                                 f"(EMBED_MAX_TOKENS; exceeded at input[{i}] of {len(texts)}); split them over "
                                 "several requests")
        return counts

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
            texts = [t for job, start, end in group for t in job.texts[start:end]]
            batch_id = next(self._ids)
            try:
                vectors = await asyncio.to_thread(self._decode, texts)
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
                    job.future.set_result(Embeddings(vectors=job.vectors, tokens=sum(job.counts),
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
                n = job.counts[end]
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

    def _decode(self, texts: list[str]) -> list[list[float]]:
        # one decode: the group fits n_batch tokens and n_seq_max sequences, which is when Llama.embed makes one
        vectors: list[list[float]] = self.llm.embed(texts, normalize=self.normalize, truncate=False)
        return vectors
