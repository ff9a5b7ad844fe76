"""The head's interface: what a step asks of a model's head (HeadSpec) and what it
returns (HeadOutput), one row per head position.

The head is the final RMSNorm, the lm_head (up to the vocabulary both models share) and
the token choice, with the router folded in where one is given (DecoderLM.head). Its
results for a batch are held in one [3, B] float64 tensor (token ids, top probability,
router score), so that on a GPU they reach the host in one copy, from an eager step or
a CUDA graph alike; HeadOutput is the only place that layout is known.
"""
from dataclasses import dataclass, replace
from typing import List, Optional, Sequence as Seq, Tuple, Union

import torch

from citer.kernels.sampling import NO_FILTER, Filter

from .router import RouterParams

Rows = Union[List, torch.Tensor]  # per row: a host list, or a [B] tensor on the model's device (a graph's buffer)


@dataclass(frozen=True)
class HeadSpec:
    """Per head row: how its token is chosen and what else it needs."""

    temperature: Rows  # float; 0 = greedy (so are temperatures under MIN_TEMPERATURE)
    seeds: Rows  # int: the row's sampling seed for this step (0 for greedy rows)
    filters: Optional[List[Filter]] = None  # (top_k, top_p, banned ids) when some row filters, else None
    router: Optional[RouterParams] = None  # score every row with this router
    want_probs: Optional[List[bool]] = None  # per row: also its sampling distribution (from full logits)
    want_logprobs: Optional[List[bool]] = None  # per row: also the log-softmax of its raw logits

    def __len__(self) -> int:
        return len(self.temperature)

    def rows(self, idx: Seq[int]) -> "HeadSpec":
        """The spec of a subset of rows (host lists only)."""
        pick = lambda xs: [xs[i] for i in idx] if xs is not None else None  # noqa: E731
        return HeadSpec(pick(self.temperature), pick(self.seeds), only_filtering(pick(self.filters)), self.router,
                        any_true(pick(self.want_probs)), any_true(pick(self.want_logprobs)))

    def without_router(self) -> "HeadSpec":
        return replace(self, router=None)

    def tensors(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> (temperature [B] float32, seeds [B] int64) on the device."""
        t, s = self.temperature, self.seeds
        if not isinstance(t, torch.Tensor):
            t = torch.tensor(t, dtype=torch.float32, device=device)
        if not isinstance(s, torch.Tensor):
            s = torch.tensor(s, dtype=torch.int64, device=device)
        return t, s

    def needs_logits(self, i: int) -> bool:
        """Row i needs its full logits row (filters, its distribution, or logprobs)."""
        return bool((self.filters and self.filters[i] != NO_FILTER) or (self.want_probs and self.want_probs[i])
                    or (self.want_logprobs and self.want_logprobs[i]))


def only_filtering(filters: Optional[List[Filter]]) -> Optional[List[Filter]]:
    """None unless some row filters (so the fused head can serve the rows)."""
    return filters if filters is not None and any(f != NO_FILTER for f in filters) else None


def any_true(flags: Optional[List[bool]]) -> Optional[List[bool]]:
    return flags if flags is not None and any(flags) else None


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
