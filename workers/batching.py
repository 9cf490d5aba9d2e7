"""Continuous batching: one llama.cpp context decodes every active request together.

One thread owns the context. Each step it builds one `llama_batch` holding the next token of every generating
sequence plus prompt chunks of newly admitted ones (at most `prefill_chunk` prompt tokens per step, so a long
prompt does not stall the others), calls `llama_decode` once, and samples each sequence that produced logits
with its own native sampler chain. The weights are read once per step for all sequences, which is where the
throughput of several requests comes from on a CPU. A sequence that ends (end of generation, max_tokens, a stop
string, cancel, deadline) frees its slot in the same step and the slot takes the next waiting request.

The KV cache is shared by all sequences (`kv_tokens` cells, by default `ctx_size × slots`). A request is admitted
when a slot is free and the cache has room for its prompt plus max_tokens beside what running requests reserved;
otherwise it waits. A finished sequence's cells stay in the cache until the room is needed: a new prompt that
starts with tokens held by any sequence (a shared system prompt, a chat turn extending the last one) takes that
prefix by `llama_memory_seq_cp` (or by trimming its own slot) and computes only the rest (prefix reuse).
"""

from __future__ import annotations

import asyncio
import ctypes
import queue
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from . import sampling
from .generation import Completion, Expired, token_budget
from .protocol import BadRequest, FinishReason, Params, SlotUsage, now_ms
from .sequence import Sequence, TextStream

_CLOSE = object()
PREFIX_MIN = 16  # shorter shared starts (a chat template's first tokens) are not worth reporting as reuse


class Scheduler:
    """One model, one context, `slots` sequences decoded together. Construct, then `await load()` (or `open()`
    from a thread); `await complete(...)` from any event loop; `close()` at the end."""

    def __init__(self, path: Path, *, slots: int, ctx_size: int, threads: int, default_max_tokens: int = 128,
                 n_batch: int = 512, prefill_chunk: int = 256, kv_tokens: int = 0, reuse: bool = True,
                 model: Any = None, flash_attn: bool | None = None) -> None:
        self.path = path
        self.flash_attn = flash_attn  # None: llama.cpp decides (its default, as llama-server's)
        self._own_model = model is None  # else a loaded llama_model (the Engine's): shared weights, not freed here
        self.slots = slots
        self.ctx_size = ctx_size  # per sequence: a prompt plus its answer fit in it, as with the Engine
        self.kv_tokens = kv_tokens or ctx_size * slots  # the shared cache, all sequences together
        self.reuse = reuse  # keep finished sequences' cells for prefix reuse
        self.threads = threads
        self.default_max_tokens = default_max_tokens
        self.n_batch = max(n_batch, prefill_chunk + slots)
        self.prefill_chunk = prefill_chunk
        self.load_seconds = 0.0
        self.steps = 0  # llama_decode calls so far
        self._model: Any = model
        self._ctx: Any = None
        self._vocab: Any = None
        self._mem: Any = None
        self._batch: Any = None
        self._n_vocab = 0
        self._inbox: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._active: dict[int, Sequence] = {}  # seq_id -> sequence; loop thread only
        self._waiting: deque[Sequence] = deque()  # loop thread only
        self._free_ids: list[int] = list(range(slots))
        self._cells: list[list[int]] = [[] for _ in range(slots)]  # tokens in the cache per seq_id, by position
        self._used_at: list[float] = [0.0] * slots  # when each seq_id last finished (the oldest kept goes first)
        self._n_swa = 0  # the model's sliding attention window (0: none)
        self._piece_buf = ctypes.create_string_buffer(64)  # a token's bytes; decode thread only
        self._abort = threading.Event()

    # --- life cycle ---------------------------------------------------------

    async def load(self) -> None:
        """Load the model and create the context (blocking work in a thread), then start the decode loop."""
        await asyncio.to_thread(self.open)

    def open(self) -> None:
        import llama_cpp as ll
        from llama_cpp._logger import set_verbose

        t0 = time.perf_counter()
        set_verbose(False)
        ll.llama_backend_init()
        model = self._model
        if self._own_model:
            model = ll.llama_model_load_from_file(str(self.path).encode(), ll.llama_model_default_params())
            if not model:
                raise RuntimeError(f"llama.cpp could not load {self.path}; check that it is a GGUF file")
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = self.kv_tokens
        cparams.n_batch = self.n_batch
        cparams.n_ubatch = self.n_batch
        cparams.n_seq_max = self.slots
        cparams.n_threads = self.threads
        cparams.n_threads_batch = self.threads
        cparams.kv_unified = True  # one cache shared by all sequences: a short answer leaves room to others
        # Sliding-window layers keep only their window per sequence (llama-server's default; the full-size
        # window cache is ~240 MiB more for gemma3 at 8 × 2048): prefix reuse checks the window is still there.
        cparams.swa_full = False
        if self.flash_attn is not None:
            cparams.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_ENABLED if self.flash_attn else \
                ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
        ctx = ll.llama_init_from_model(model, cparams)
        if not ctx:
            if self._own_model:
                ll.llama_model_free(model)
            raise RuntimeError(f"llama.cpp could not create a context of {cparams.n_ctx} tokens for {self.slots} "
                               "sequences; lower CTX_SIZE or the slot count")
        self._model, self._ctx = model, ctx
        self._vocab = ll.llama_model_get_vocab(model)
        self._n_vocab = ll.llama_vocab_n_tokens(self._vocab)
        self._mem = ll.llama_get_memory(ctx)
        self._n_swa = max(0, ll.llama_model_n_swa(model))
        self._batch = ll.llama_batch_init(self.n_batch, 0, 1)
        self._thread = threading.Thread(target=self._run, name="batch-decode", daemon=True)
        self._thread.start()
        self.load_seconds = time.perf_counter() - t0

    def close(self) -> None:
        """Stop the loop (requests still running end as cancelled) and free the context and model."""
        import llama_cpp as ll

        if self._thread is not None:
            self._inbox.put(_CLOSE)
            self._thread.join()
            self._thread = None
        if self._batch is not None:
            ll.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            ll.llama_free(self._ctx)
            self._ctx = None
        if self._model and self._own_model:
            ll.llama_model_free(self._model)
        self._model = None

    def abort(self) -> None:
        """End every running and waiting request within a step as cancelled (a drain that ran out of time)."""
        self._abort.set()
        self._inbox.put(None)  # wake the loop

    @property
    def busy(self) -> int:
        return self.slots - len(self._free_ids)

    def usage(self) -> SlotUsage:
        """Slots, KV cache and what each sequence is doing right now (read from any thread: a snapshot, not a
        lock; a sequence moving between lists in this instant may show twice or not at all)."""
        active = list(self._active.values())
        waiting = [*self._waiting, *(s for s in list(self._inbox.queue) if isinstance(s, Sequence))]
        kept = sum(len(self._cells[i]) for i in list(self._free_ids))
        now = time.perf_counter()
        views = {id(s): s.view(now) for s in (*active, *waiting)}
        return SlotUsage(slots=self.slots, busy=len(active), waiting=len(waiting), kv_tokens=self.kv_tokens,
                         kv_reserved=sum(s.need for s in active), kv_kept=kept, requests=list(views.values()))

    # --- requests -----------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        """Prompt tokens as the Engine makes them (a BOS, special tokens parsed)."""
        import llama_cpp as ll

        data = text.encode()
        size = len(data) + 16
        buf = (ll.llama_token * size)()
        n = ll.llama_tokenize(self._vocab, data, len(data), buf, size, True, True)
        if n < 0:
            size = -n
            buf = (ll.llama_token * size)()
            n = ll.llama_tokenize(self._vocab, data, len(data), buf, size, True, True)
        return list(buf[:n])

    async def complete(self, prompt: str | list[int], params: Params, *, stop: tuple[str, ...] = (),
                       grammar: str | None = None, on_delta: Any = None, cancel: threading.Event | None = None,
                       deadline_ms: int | None = None, label: str | None = None) -> Completion:
        """Generate from `prompt` (text or token ids) like `Engine.complete`: ends at the caller's stop strings
        or `stop`, `on_delta` gets final text pieces (from the decode thread), setting `cancel` ends it within a
        step with finish_reason `cancelled`, past `deadline_ms` (epoch ms) it raises Expired. Waits for a free
        sequence when all are busy. `label` (the req_id) names it in `usage()`."""
        if self._thread is None:
            raise RuntimeError("the scheduler is not running; await load() first")
        tokens = await asyncio.to_thread(self.tokenize, prompt) if isinstance(prompt, str) else list(prompt)
        max_tokens = token_budget(len(tokens), params, self.ctx_size, self.default_max_tokens)
        if len(tokens) + max_tokens > self.kv_tokens:
            raise BadRequest("context_overflow", f"prompt is {len(tokens)} tokens and max_tokens {max_tokens}: "
                             f"together more than the KV cache's {self.kv_tokens} (KV_CACHE_TOKENS); ask for at "
                             f"most {self.kv_tokens - len(tokens)} tokens or raise KV_CACHE_TOKENS")
        if deadline_ms is not None and now_ms() >= deadline_ms:
            raise Expired(0)
        # A grammar compiles off the event loop and off the decode thread (it can take milliseconds).
        chain = await asyncio.to_thread(sampling.build_chain, self._vocab, self._n_vocab, params, grammar)
        loop = asyncio.get_running_loop()
        seq = Sequence(tokens=tokens, chain=chain, max_tokens=max_tokens, exact=params.seed is not None and
                       params.temperature != 0,
                       stream=TextStream((*(params.stop or []), *stop)), future=loop.create_future(), loop=loop,
                       on_delta=on_delta, cancel=cancel or threading.Event(), deadline_ms=deadline_ms, label=label)
        self._inbox.put(seq)
        try:
            return await seq.future
        except asyncio.CancelledError:
            seq.cancel.set()  # the caller is gone: free its sequence in the next step
            raise

    # --- the decode loop (its own thread) -----------------------------------

    def _run(self) -> None:
        try:
            while self._step():
                pass
        finally:
            for seq in [*self._active.values(), *self._waiting]:
                self._finish(seq, seq.result("cancelled"))
            while True:
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, Sequence):
                    sampling.free_chain(item.chain)
                    item.resolve(RuntimeError("the scheduler closed"))

    def _take_inbox(self, block: bool) -> bool:
        """Move queued requests to the waiting line; False when close() was asked for."""
        while True:
            try:
                item = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if item is _CLOSE:
                return False
            if isinstance(item, Sequence):
                self._waiting.append(item)

    def _step(self) -> bool:
        import llama_cpp as ll

        idle = not self._active and not self._waiting
        if not self._take_inbox(block=idle):
            return False
        now = now_ms()
        aborting = self._abort.is_set()
        for seq in [*self._active.values(), *self._waiting]:  # ends decided before this step's work
            if seq.cancel.is_set() or aborting:
                self._finish(seq, seq.result("cancelled"))
            elif seq.deadline_ms is not None and now >= seq.deadline_ms:
                self._finish(seq, Expired(seq.tokens_out))
        self._abort.clear()
        while self._waiting and self._free_ids and self._make_room(self._waiting[0].need):
            self._admit(self._waiting.popleft())  # in arrival order: a big request is not overtaken forever
        if not self._active:
            return True
        # One token for every generating sequence, then prompt chunks in admission order.
        b = self._batch
        n = 0
        outputs: list[tuple[int, Sequence]] = []
        for seq in self._active.values():
            if not seq.prefilling:
                self._put(b, n, seq.next_token, seq.n_past, seq.seq_id, True)
                seq.n_past += 1
                outputs.append((n, seq))
                n += 1
        budget = self.prefill_chunk
        for seq in self._active.values():
            if budget <= 0:
                break
            if seq.prefilling:
                take = min(budget, len(seq.tokens) - seq.n_past)
                for _ in range(take):
                    last = seq.n_past + 1 == len(seq.tokens)
                    self._put(b, n, seq.tokens[seq.n_past], seq.n_past, seq.seq_id, last)
                    if last:
                        outputs.append((n, seq))
                    seq.n_past += 1
                    n += 1
                budget -= take
        b.n_tokens = n
        rc = ll.llama_decode(self._ctx, b)
        self.steps += 1
        if rc != 0:
            error = RuntimeError(f"llama_decode failed ({rc}) with {len(self._active)} sequences")
            for seq in list(self._active.values()):
                self._finish(seq, error)
            ll.llama_memory_clear(self._mem, True)  # what the failed step left is unknown: keep nothing
            self._cells = [[] for _ in range(self.slots)]
            return True
        for i, seq in outputs:
            self._sample(seq, i)
        return True

    # --- admission and the cache -------------------------------------------

    def _make_room(self, need: int) -> bool:
        """Whether `need` more cells fit beside what running sequences reserved, giving up kept (finished)
        sequences' cells, oldest first, until they do."""
        import llama_cpp as ll

        reserved = sum(s.need for s in self._active.values())
        kept = sorted((i for i in self._free_ids if self._cells[i]), key=lambda i: self._used_at[i])
        held = sum(len(self._cells[i]) for i in kept)
        while reserved + held + need > self.kv_tokens and kept:
            i = kept.pop(0)
            ll.llama_memory_seq_rm(self._mem, i, -1, -1)
            held -= len(self._cells[i])
            self._cells[i] = []
        return reserved + held + need <= self.kv_tokens

    def _admit(self, seq: Sequence) -> None:
        """Give `seq` a free sequence id, starting from the longest prefix of its prompt found in the cache."""
        import llama_cpp as ll

        limit = len(seq.tokens) - 1  # the last prompt token is always computed: its logits give the first token
        src, best = -1, 0
        if seq.exact and not self._active:
            # A seeded draw turns on the last bits of the logits, and those move with where the sequence's cells
            # lie in the cache and what was computed with them: alone, it starts from the empty cache a freshly
            # started worker has, so the same request gives the same text on every worker of the model.
            ll.llama_memory_clear(self._mem, True)
            self._cells = [[] for _ in range(self.slots)]
        elif self.reuse:
            for i, cells in enumerate(self._cells):
                n = _common(cells, seq.tokens, limit)
                if n > best:
                    src, best = i, n
        if best < PREFIX_MIN or not self._window_kept(src, best):
            src, best = -1, 0
        if src in self._free_ids:  # a finished sequence held it: continue in its slot
            dst = src
            if not ll.llama_memory_seq_rm(self._mem, dst, best, -1):  # the model cannot cut a sequence short
                ll.llama_memory_seq_rm(self._mem, dst, -1, -1)
                best = 0
        else:  # an empty slot, or the one kept longest; copy the prefix from the sequence that has it
            dst = min(self._free_ids, key=lambda i: (bool(self._cells[i]), self._used_at[i]))
            ll.llama_memory_seq_rm(self._mem, dst, -1, -1)
            if best:
                ll.llama_memory_seq_cp(self._mem, src, dst, 0, best)
        self._cells[dst] = seq.tokens[:best]
        self._free_ids.remove(dst)
        seq.seq_id, seq.n_past, seq.cached = dst, best, best
        seq.t0 = time.perf_counter()  # TTFT from admission, as the Engine counts from borrowing a context
        self._active[dst] = seq

    def _window_kept(self, seq_id: int, n: int) -> bool:
        """Whether a sliding-window model still holds what positions from `n` on attend to in `seq_id`
        (llama.cpp drops cells that left every window)."""
        import llama_cpp as ll

        if not self._n_swa or seq_id < 0:
            return True
        return int(ll.llama_memory_seq_pos_min(self._mem, seq_id)) <= max(0, n - self._n_swa)

    def _put(self, b: Any, i: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
        self._cells[seq_id].append(token)
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq_id
        b.logits[i] = logits

    def _sample(self, seq: Sequence, i: int) -> None:
        import llama_cpp as ll

        token = ll.llama_sampler_sample(seq.chain, self._ctx, i)  # applies the chain to row i and accepts
        if seq.first_at is None:
            seq.first_at = time.perf_counter()
        if ll.llama_vocab_is_eog(self._vocab, token):
            seq.emit(seq.stream.flush())
            self._finish(seq, seq.result("stop"))
            return
        seq.tokens_out += 1
        seq.emit(seq.stream.feed(self._piece(token)))
        finish: FinishReason | None = None
        if seq.stream.stopped:
            finish = "stop"
        elif seq.tokens_out >= seq.max_tokens:
            seq.emit(seq.stream.flush())
            finish = "length"
        if finish:
            self._finish(seq, seq.result(finish))
        else:
            seq.next_token = token

    def _piece(self, token: int) -> bytes:
        import llama_cpp as ll

        buf = self._piece_buf
        n = ll.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:  # a longer piece than any before: a bigger buffer from now on
            buf = self._piece_buf = ctypes.create_string_buffer(-n)
            n = ll.llama_token_to_piece(self._vocab, token, buf, -n, 0, False)
        return ctypes.string_at(buf, n)

    def _finish(self, seq: Sequence, outcome: Completion | BaseException) -> None:
        """Take a sequence out of the cache and the slot table and answer its caller."""
        import llama_cpp as ll

        if seq.seq_id >= 0 and self._active.get(seq.seq_id) is seq:
            if not self.reuse:
                ll.llama_memory_seq_rm(self._mem, seq.seq_id, -1, -1)
                self._cells[seq.seq_id] = []
            self._used_at[seq.seq_id] = time.monotonic()
            del self._active[seq.seq_id]
            self._free_ids.append(seq.seq_id)
            seq.seq_id = -1
        elif seq in self._waiting:
            self._waiting.remove(seq)
        sampling.free_chain(seq.chain)
        seq.chain = None
        seq.resolve(outcome)


def _common(cells: list[int], tokens: list[int], limit: int) -> int:
    """Length of the common start of `cells` and `tokens`, at most `limit`."""
    n = min(len(cells), limit)
    i = 0
    while i < n and cells[i] == tokens[i]:
        i += 1
    return i
