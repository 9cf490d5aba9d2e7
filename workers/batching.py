"""Continuous batching: one llama.cpp context decodes every active request together.

One thread owns the context. Each step it builds one `llama_batch` holding the next token of every generating
sequence plus prompt chunks of newly admitted ones (at most `prefill_chunk` prompt tokens per step, so a long
prompt does not stall the others), calls `llama_decode` once, and samples each sequence that produced logits
with its own native sampler chain. The weights are read once per step for all sequences, which is where the
throughput of several requests comes from on a CPU. A sequence that ends (end of generation, max_tokens, a stop
string, cancel, deadline) leaves the KV cache in the same step and its slot takes the next waiting request.
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
from .generation import Completion, Expired
from .protocol import BadRequest, FinishReason, Params, now_ms
from .sequence import Sequence, TextStream

_CLOSE = object()


class Scheduler:
    """One model, one context, `slots` sequences decoded together. Construct, then `await load()` (or `open()`
    from a thread); `await complete(...)` from any event loop; `close()` at the end."""

    def __init__(self, path: Path, *, slots: int, ctx_size: int, threads: int, default_max_tokens: int = 128,
                 n_batch: int = 512, prefill_chunk: int = 256) -> None:
        self.path = path
        self.slots = slots
        self.ctx_size = ctx_size  # per sequence: a prompt plus its answer fit in it, as with the Engine
        self.threads = threads
        self.default_max_tokens = default_max_tokens
        self.n_batch = max(n_batch, prefill_chunk + slots)
        self.prefill_chunk = prefill_chunk
        self.load_seconds = 0.0
        self.steps = 0  # llama_decode calls so far
        self._model: Any = None
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
        mparams = ll.llama_model_default_params()
        model = ll.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not model:
            raise RuntimeError(f"llama.cpp could not load {self.path}; check that it is a GGUF file")
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = self.ctx_size * self.slots
        cparams.n_batch = self.n_batch
        cparams.n_ubatch = self.n_batch
        cparams.n_seq_max = self.slots
        cparams.n_threads = self.threads
        cparams.n_threads_batch = self.threads
        cparams.kv_unified = True  # one cache shared by all sequences: a short answer leaves room to others
        ctx = ll.llama_init_from_model(model, cparams)
        if not ctx:
            ll.llama_model_free(model)
            raise RuntimeError(f"llama.cpp could not create a context of {cparams.n_ctx} tokens for {self.slots} "
                               "sequences; lower CTX_SIZE or the slot count")
        self._model, self._ctx = model, ctx
        self._vocab = ll.llama_model_get_vocab(model)
        self._n_vocab = ll.llama_vocab_n_tokens(self._vocab)
        self._mem = ll.llama_get_memory(ctx)
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
        if self._model:
            ll.llama_model_free(self._model)
            self._model = None

    def abort(self) -> None:
        """End every running and waiting request within a step as cancelled (a drain that ran out of time)."""
        self._abort.set()
        self._inbox.put(None)  # wake the loop

    @property
    def busy(self) -> int:
        return self.slots - len(self._free_ids)

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
                       deadline_ms: int | None = None) -> Completion:
        """Generate from `prompt` (text or token ids) like `Engine.complete`: ends at the caller's stop strings
        or `stop`, `on_delta` gets final text pieces (from the decode thread), setting `cancel` ends it within a
        step with finish_reason `cancelled`, past `deadline_ms` (epoch ms) it raises Expired. Waits for a free
        sequence when all are busy."""
        if self._thread is None:
            raise RuntimeError("the scheduler is not running; await load() first")
        tokens = await asyncio.to_thread(self.tokenize, prompt) if isinstance(prompt, str) else list(prompt)
        room = self.ctx_size - len(tokens)
        if room < 1:
            raise BadRequest("context_overflow", f"prompt is {len(tokens)} tokens but the context holds "
                             f"{self.ctx_size}; shorten the input or raise CTX_SIZE")
        if params.max_tokens is not None and params.max_tokens > room:
            raise BadRequest("context_overflow", f"prompt is {len(tokens)} tokens and max_tokens "
                             f"{params.max_tokens}: together more than the context's {self.ctx_size} (CTX_SIZE); "
                             f"ask for at most {room} tokens or shorten the input")
        if deadline_ms is not None and now_ms() >= deadline_ms:
            raise Expired(0)
        # A grammar compiles off the event loop and off the decode thread (it can take milliseconds).
        chain = await asyncio.to_thread(sampling.build_chain, self._vocab, self._n_vocab, params, grammar)
        loop = asyncio.get_running_loop()
        seq = Sequence(tokens=tokens, chain=chain, max_tokens=params.max_tokens or min(self.default_max_tokens, room),
                       stream=TextStream((*(params.stop or []), *stop)), future=loop.create_future(), loop=loop,
                       on_delta=on_delta, cancel=cancel or threading.Event(), deadline_ms=deadline_ms)
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
        while self._waiting and self._free_ids:
            seq = self._waiting.popleft()
            seq.seq_id = self._free_ids.pop()
            seq.t0 = time.perf_counter()  # TTFT from admission, as the Engine counts from borrowing a context
            self._active[seq.seq_id] = seq
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
            return True
        for i, seq in outputs:
            self._sample(seq, i)
        return True

    @staticmethod
    def _put(b: Any, i: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
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

        buf = ctypes.create_string_buffer(64)
        n = ll.llama_token_to_piece(self._vocab, token, buf, 64, 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = ll.llama_token_to_piece(self._vocab, token, buf, -n, 0, False)
        return buf.raw[:n]

    def _finish(self, seq: Sequence, outcome: Completion | BaseException) -> None:
        """Take a sequence out of the cache and the slot table and answer its caller."""
        import llama_cpp as ll

        if seq.seq_id >= 0 and self._active.get(seq.seq_id) is seq:
            ll.llama_memory_seq_rm(self._mem, seq.seq_id, -1, -1)
            del self._active[seq.seq_id]
            self._free_ids.append(seq.seq_id)
            seq.seq_id = -1
        elif seq in self._waiting:
            self._waiting.remove(seq)
        sampling.free_chain(seq.chain)
        seq.chain = None
        seq.resolve(outcome)
