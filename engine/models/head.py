"""The head's interface: what a step asks of a model's head, and what it returns.

The head is the final RMSNorm, the lm_head (up to the vocabulary both models share) and
the token choice, with the router folded in where one is given (DecoderLM.head). Its
results for a batch are held in one [3, B] float64 tensor (token ids, top
probability, router score), so that on a GPU they reach the host in one copy, from an
eager step or a CUDA graph alike; this class is the only place that layout is known.
"""
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from .router import RouterParams


@dataclass
class HeadInputs:
    temperature: torch.Tensor  # [B] float32 on the model's device, 0 = greedy
    seeds: torch.Tensor  # [B] int64 on the model's device: each row's sampling seed for this step
    router: Optional[RouterParams] = None  # score every row with this router
    filters: Optional[List[tuple]] = None  # per row (top_k, top_p, banned ids) when some row filters
    want_probs: Optional[List[bool]] = None  # per row: also its sampling distribution (from full logits)
    want_logprobs: Optional[List[bool]] = None  # per row: also the log-softmax of its raw logits


class HeadOutput:
    """Per row of a batch: the chosen token, the model's top probability, the router score."""

    def __init__(self, tokens: torch.Tensor, top_prob: torch.Tensor, router_score: Optional[torch.Tensor],
                 probs: Optional[torch.Tensor] = None, logprobs: Optional[torch.Tensor] = None):
        score = router_score if router_score is not None else torch.full_like(top_prob, float("nan"))
        self.packed = torch.stack([t.to(torch.float64) for t in (tokens, top_prob, score)])  # [3, B]
        self.has_router = router_score is not None
        self.probs = probs  # [B, V] float32: the rows' sampling distributions (rows not asked for: 0), or None
        self.logprobs = logprobs  # [B, V] float32: log-softmax of the raw logits (rows not asked for: 0), or None

    @classmethod
    def _view(cls, packed: torch.Tensor, has_router: bool) -> "HeadOutput":
        out = cls.__new__(cls)
        out.packed, out.has_router, out.probs, out.logprobs = packed, has_router, None, None
        return out

    def __len__(self) -> int:
        return self.packed.shape[1]

    def first(self, n: int) -> "HeadOutput":
        """The first n rows (a view: a CUDA graph's output stays graph memory)."""
        return self._view(self.packed[:, :n], self.has_router)

    def select(self, idx: torch.Tensor) -> "HeadOutput":
        """Rows idx [n] (a gather: a copy, not graph memory)."""
        out = self._view(self.packed[:, idx], self.has_router)
        out.probs = self.probs[idx] if self.probs is not None else None
        out.logprobs = self.logprobs[idx] if self.logprobs is not None else None
        return out

    def to_host(self) -> Tuple[List[int], List[float], Optional[List[float]]]:
        """-> (tokens, top_prob, router_score or None without a router), in one copy."""
        tokens, top_prob, score = self.packed.cpu().tolist()
        return [int(t) for t in tokens], top_prob, score if self.has_router else None
