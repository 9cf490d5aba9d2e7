"""The state of one request inside the batch: its tokens, its sampler chain and the text it has produced.

Text leaves a sequence only when it is final: the bytes of a character split over two tokens wait for the
rest, and text that could still become the start of a stop string waits until it cannot.
"""

from __future__ import annotations

import asyncio
import codecs
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .generation import Completion
from .protocol import FinishReason, SlotRequest


def holdback(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of `text` could be the beginning of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class TextStream:
    """Bytes of token pieces in, final text out: UTF-8 safe and stop-string aware."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")  # as llama-cpp-python does
        self._pending = ""  # decoded, not yet released
        self.parts: list[str] = []  # released text
        self.stopped = False  # a stop string was found; nothing more is released

    def feed(self, piece: bytes) -> str:
        """Add a token's bytes; the text that is now final ("" if none). Sets `stopped` at a stop string."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(piece)
        if not self.stops:
            return self._release(len(self._pending))
        hits = [i for i in (self._pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out = self._release(min(hits))
            self._pending = ""
            return out
        return self._release(len(self._pending) - holdback(self._pending, self.stops))

    def flush(self) -> str:
        """The end of the text (no stop string came): everything held back."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(b"", final=True)
        return self._release(len(self._pending))

    def _release(self, n: int) -> str:
        out, self._pending = self._pending[:n], self._pending[n:]
        if out:
            self.parts.append(out)
        return out

    @property
    def text(self) -> str:
        return "".join(self.parts)


@dataclass
class Sequence:
    """One admitted (or waiting) request. Owned by the scheduler's loop thread once queued."""

    tokens: list[int]  # the prompt
    chain: Any  # its llama_sampler chain
    max_tokens: int
    stream: TextStream
    future: asyncio.Future[Completion]
    loop: asyncio.AbstractEventLoop
    on_delta: Callable[[str], None] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    deadline_ms: int | None = None
    seq_id: int = -1  # its llama.cpp sequence while admitted
    n_past: int = 0  # tokens of this sequence in the KV cache
    cached: int = 0  # of the prompt, tokens found in the KV cache at admission (prefix reuse)
    exact: bool = False  # seeded sampling: run from an empty cache when it runs alone, so the seed reproduces
    next_token: int = -1  # sampled, not yet decoded
    tokens_out: int = 0  # sampled tokens that are part of the answer (the end-of-generation token is not)
    t0: float = field(default_factory=time.perf_counter)
    first_at: float | None = None
    label: str | None = None  # the req_id, for the slot view (Scheduler.usage)
    submitted: float = field(default_factory=time.perf_counter)  # handed to the scheduler (t0 moves at admission)

    @property
    def prefilling(self) -> bool:
        return self.n_past < len(self.tokens)

    @property
    def ttft_ms(self) -> float | None:
        return (self.first_at - self.t0) * 1000 if self.first_at is not None else None

    def emit(self, text: str) -> None:
        if text and self.on_delta:
            self.on_delta(text)

    def result(self, finish: FinishReason) -> Completion:
        return Completion(text=self.stream.text, tokens_in=len(self.tokens), tokens_out=self.tokens_out,
                          finish_reason=finish, ttft_ms=self.ttft_ms, cached_tokens=self.cached)

    def view(self, now: float) -> SlotRequest:
        """What the slot view shows of it (read from another thread: a snapshot of plain fields)."""
        admitted = self.seq_id >= 0
        # decode from its first token on (its last prompt chunk is in the batch until that token is sampled)
        return SlotRequest(req_id=self.label or "", state="waiting" if not admitted else "prefill"
                           if self.first_at is None else "decode", slot=self.seq_id if admitted else None,
                           tokens_in=len(self.tokens), tokens_out=self.tokens_out,
                           elapsed_ms=round((now - self.submitted) * 1000, 1))

    @property
    def need(self) -> int:
        """KV cells this sequence may come to hold: its prompt and every token it may generate."""
        return len(self.tokens) + self.max_tokens

    def resolve(self, value: Completion | BaseException) -> None:
        """Hand the outcome to the caller's event loop (from the loop thread)."""
        def settle() -> None:
            if self.future.done():
                return
            if isinstance(value, BaseException):
                self.future.set_exception(value)
            else:
                self.future.set_result(value)

        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the caller's loop is closed: nobody is waiting
            pass
