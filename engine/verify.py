"""Checking a sequence's tentative tokens against the LLM's catch-up over them.

The catch-up gives the LLM's choice after each of the positions [committed - 1, len):
row j predicts position committed + j, so rows 0 .. w - 1 judge the w tentative tokens
and row w gives the token after them. `verify` returns how many tentative tokens stand
and the LLM's token for the next position:

- greedy: tentative tokens stand while they equal the LLM's argmax; at the first that
  differs the LLM's argmax replaces it. The result is the LLM's greedy output exactly.
- sampling (speculative sampling, Leviathan et al. 2023 / Chen et al. 2023): tentative
  token x, drawn by the SLM from q, stands with probability min(1, p(x) / q(x)); the
  first that does not is replaced by a draw from norm(max(p - q, 0)); when all stand,
  the next token is drawn from p. p and q are the distributions the two models sample
  from (temperature, top-k, top-p applied), so every output token follows the LLM's
  distribution. Draws come from the sequence's own generator: a seed gives one output.
"""
from typing import List, Optional, Tuple

import torch

from .sequence import Sequence


def verify(seq: Sequence, llm_tokens: List[int], llm_probs: Optional[torch.Tensor]) -> Tuple[int, int]:
    """llm_tokens: the LLM's argmax per row (w + 1 of them); llm_probs [w + 1, V] on the
    CPU for a sampling request (None: greedy) -> (tentative tokens kept, the LLM's token
    at position committed + kept)."""
    tentative = seq.token_ids[seq.committed:]
    if llm_probs is None:
        for j, x in enumerate(tentative):
            if llm_tokens[j] != x:
                return j, llm_tokens[j]
        return len(tentative), llm_tokens[len(tentative)]
    for j, x in enumerate(tentative):
        p, q = llm_probs[j], seq.draft_probs[seq.committed + j]
        u = float(torch.rand((), generator=seq.sampler))
        if u * float(q[x]) < float(p[x]):  # u < p(x) / q(x); q(x) > 0: x was drawn from q
            continue
        residual = (p - q).clamp_min_(0.0)
        total = float(residual.sum())
        return j, _draw(residual / total if total > 0 else p, seq)
    return len(tentative), _draw(llm_probs[len(tentative)], seq)


def _draw(probs: torch.Tensor, seq: Sequence) -> int:
    return int(torch.multinomial(probs.double(), 1, generator=seq.sampler))
