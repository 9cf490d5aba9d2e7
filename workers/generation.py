"""What a generation or an embedding call returns, and how it ends past the caller's deadline; shared by the
per-context engine (workers/engine.py) and the batching scheduler (workers/batching.py)."""

from __future__ import annotations

from dataclasses import dataclass

from .protocol import BadRequest, FinishReason, Params


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


def token_budget(n_prompt: int, p: Params, ctx_size: int, default_max_tokens: int) -> int:
    """The tokens a generation may produce after an `n_prompt`-token prompt in a `ctx_size` context: the asked
    max_tokens, refused (never cut, as OpenAI does) when it does not fit, or the default within the room."""
    room = ctx_size - n_prompt
    if room < 1:
        raise BadRequest("context_overflow", f"prompt is {n_prompt} tokens but the context holds {ctx_size}; "
                         "shorten the input or raise CTX_SIZE")
    if p.max_tokens is not None and p.max_tokens > room:
        raise BadRequest("context_overflow", f"prompt is {n_prompt} tokens and max_tokens {p.max_tokens}: "
                         f"together more than the context's {ctx_size} (CTX_SIZE); ask for at most {room} tokens "
                         "or shorten the input")
    return p.max_tokens or min(default_max_tokens, room)
