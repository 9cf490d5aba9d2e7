"""One native llama.cpp sampler chain per request.

The chain runs inside llama.cpp (`llama_sampler_sample` reads the logits row where it lies), so no
vocabulary-sized array crosses into Python per token. Its order and defaults are those of llama-cpp-python's
`create_completion`, which workers/engine.py uses: the same seed at the same temperature gives the same text.
"""

from __future__ import annotations

import random
from typing import Any

from .protocol import BadRequest, Params

# The defaults of both engines (llama-cpp-python's own; workers/engine.py passes these to create_completion).
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

    check_logit_bias(p, n_vocab)
    chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
    try:
        if p.logit_bias:
            biases = (ll.llama_logit_bias * len(p.logit_bias))()
            for i, (token, bias) in enumerate(p.logit_bias.items()):
                biases[i] = ll.llama_logit_bias(token, bias)
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_logit_bias(n_vocab, len(p.logit_bias), biases))
        if grammar:
            # First: every later step sees only the tokens the grammar allows.
            g = ll.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
            if not g:
                raise BadRequest("invalid_grammar", "llama.cpp could not parse the grammar; check that it has a "
                                 "`root` rule and that no rule starts with itself")
            ll.llama_sampler_chain_add(chain, g)
        penalty = p.repeat_penalty if p.repeat_penalty is not None else REPEAT_PENALTY
        frequency, presence = p.frequency_penalty or 0.0, p.presence_penalty or 0.0
        if (penalty, frequency, presence) != (1.0, 0.0, 0.0):
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_penalties(n_vocab, PENALTY_LAST_N, penalty,
                                                                              frequency, presence))
        temperature = p.temperature if p.temperature is not None else TEMPERATURE
        if temperature == 0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
            return chain
        top_k = p.top_k if p.top_k is not None else TOP_K
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_k(top_k))
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_p(p.top_p if p.top_p is not None else TOP_P, 1))
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_min_p(p.min_p if p.min_p is not None else MIN_P, 1))
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(temperature))
        # Without a seed each request draws its own (a shared default seed would repeat answers).
        seed = p.seed if p.seed is not None else random.getrandbits(31)
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain
    except BaseException:
        ll.llama_sampler_free(chain)
        raise


def check_logit_bias(p: Params, n_vocab: int) -> None:
    """A bias on a token the model does not have is the caller's mistake, not an out-of-range write."""
    if p.logit_bias and (bad := [t for t in p.logit_bias if t >= n_vocab]):
        raise BadRequest("invalid_request", f"logit_bias names token {bad[0]}, but this model's tokens are 0 to "
                         f"{n_vocab - 1}; use token ids of this model's vocabulary")


def free_chain(chain: Any) -> None:
    """Free a chain and every sampler in it."""
    import llama_cpp as ll

    if chain:
        ll.llama_sampler_free(chain)
