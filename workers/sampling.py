"""One native llama.cpp sampler chain per request.

The chain runs inside llama.cpp (`llama_sampler_sample` reads the logits row where it lies), so no
vocabulary-sized array crosses into Python per token. Its order and defaults are those of llama-cpp-python's
`create_completion`, which workers/engine.py uses: the same seed at the same temperature gives the same text.
"""

from __future__ import annotations

import random
from typing import Any

from .protocol import BadRequest, Params

# Defaults of workers/engine.py (and of llama-cpp-python for the ones it does not set).
TEMPERATURE = 0.8
TOP_P = 0.95
TOP_K = 40
MIN_P = 0.05
REPEAT_PENALTY = 1.0
PENALTY_LAST_N = 64


def build_chain(vocab: Any, n_vocab: int, p: Params, grammar: str | None = None) -> Any:
    """A sampler chain for one request (free it with `free_chain`). A grammar llama.cpp refuses is a 400
    `invalid_grammar` (the worker's grammar check normally catches it earlier, with llama.cpp's reason)."""
    import llama_cpp as ll

    chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
    try:
        if grammar:
            # First: every later step sees only the tokens the grammar allows.
            g = ll.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
            if not g:
                raise BadRequest("invalid_grammar", "llama.cpp could not parse the grammar; check that it has a "
                                 "`root` rule and that no rule starts with itself")
            ll.llama_sampler_chain_add(chain, g)
        penalty = p.repeat_penalty if p.repeat_penalty is not None else REPEAT_PENALTY
        if penalty != 1.0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_penalties(n_vocab, PENALTY_LAST_N, penalty,
                                                                              0.0, 0.0))
        temperature = p.temperature if p.temperature is not None else TEMPERATURE
        if temperature == 0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
            return chain
        top_k = p.top_k if p.top_k is not None else TOP_K
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_k(top_k))
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_p(p.top_p if p.top_p is not None else TOP_P, 1))
        min_p = getattr(p, "min_p", None)  # not in the request shape yet; llama-cpp-python's default meanwhile
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_min_p(min_p if min_p is not None else MIN_P, 1))
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(temperature))
        # Without a seed each request draws its own (a shared default seed would repeat answers).
        seed = p.seed if p.seed is not None else random.getrandbits(31)
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain
    except BaseException:
        ll.llama_sampler_free(chain)
        raise


def free_chain(chain: Any) -> None:
    """Free a chain and every sampler in it."""
    import llama_cpp as ll

    if chain:
        ll.llama_sampler_free(chain)
