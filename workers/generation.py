"""What a generation or an embedding call returns, and how it ends past the caller's deadline; shared by the
per-context engine (workers/engine.py) and the batching scheduler (workers/batching.py)."""

from __future__ import annotations

from dataclasses import dataclass

from .protocol import FinishReason


class Expired(Exception):
    """The caller's deadline passed while waiting for a context or running; `done`: tokens generated (a
    completion) or inputs embedded (embeddings) when it stopped."""

    def __init__(self, done: int) -> None:
        super().__init__(f"deadline passed after {done}")
        self.done = done


@dataclass
class Completion:
    text: str
    tokens_in: int
    tokens_out: int
    finish_reason: FinishReason
    ttft_ms: float | None
    cached_tokens: int | None = None  # prompt tokens reused from the KV cache (the batched engine only)


@dataclass
class Embeddings:
    vectors: list[list[float]]
    tokens: int
    batch_id: int | None = None  # the decode call that served them, when requests are embedded together
