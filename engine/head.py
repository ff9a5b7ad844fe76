"""What one step asks of a model's head (HeadSpec) and what a model step returns (StepResult).

A HeadSpec is built once per step and model from the step's sequences: per row the
temperature, this step's sampling seed (drawn from each sequence's own generator, so a
seeded request gives the same tokens in any batch, on any head path), the top-k / top-p
filters where some row has them, and the router to score the rows with. The model's
head (citer.models.DecoderLM.head) makes the choices; StepResult carries them back per
row, aligned with the step's sequences.
"""
from dataclasses import dataclass, replace
from typing import List, Optional, Sequence as Seq

import torch

from citer.models.head import HeadInputs, RouterParams


@dataclass(frozen=True)
class HeadSpec:
    temperature: List[float]  # per row, 0 = greedy (so are temperatures under MIN_TEMPERATURE)
    seeds: List[int]  # per row: this step's sampling seed (0 for greedy rows)
    filters: Optional[List[tuple]]  # per row (top_k, top_p) when some row filters, else None
    router: Optional[RouterParams] = None  # score every row with this router
    positions: Optional[List[int]] = None  # per row: its last n positions get the head (None: 1 each)
    want_probs: Optional[List[bool]] = None  # per row: also its sampling distribution(s)

    @classmethod
    def for_seqs(cls, seqs: Seq, router: Optional[RouterParams] = None, positions: Optional[List[int]] = None,
                 want_probs: Optional[List[bool]] = None) -> "HeadSpec":
        """Draws each sampling row's seed for this step (once per step and model)."""
        temperature = [0.0 if s.params.greedy else s.params.temperature for s in seqs]
        seeds = [0 if s.params.greedy else s.next_sampling_seed() for s in seqs]
        filtered = any(s.params.filtered for s in seqs)
        filters = [(s.params.top_k, s.params.top_p) if s.params.filtered else (0, 1.0) for s in seqs] \
            if filtered else None
        if positions is not None and all(n == 1 for n in positions):
            positions = None
        if want_probs is not None and not any(want_probs):
            want_probs = None
        return cls(temperature, seeds, filters, router, positions, want_probs)

    def per_position(self) -> "HeadSpec":
        """One row per head position (each sequence's row repeated n times)."""
        if self.positions is None:
            return self
        rep = [i for i, n in enumerate(self.positions) for _ in range(n)]
        return replace(self.rows(rep), positions=None)

    def rows(self, idx: Seq[int]) -> "HeadSpec":
        """The spec of a subset of rows."""
        filters = [self.filters[i] for i in idx] if self.filters is not None else None
        if filters is not None and all(f == (0, 1.0) for f in filters):
            filters = None  # no row of the subset filters: the fused head can serve it
        positions = [self.positions[i] for i in idx] if self.positions is not None else None
        want = [self.want_probs[i] for i in idx] if self.want_probs is not None else None
        return HeadSpec([self.temperature[i] for i in idx], [self.seeds[i] for i in idx], filters, self.router,
                        positions, want if want is not None and any(want) else None)

    def without_router(self) -> "HeadSpec":
        return replace(self, router=None)

    def inputs(self, device: torch.device) -> HeadInputs:
        return HeadInputs(torch.tensor(self.temperature, dtype=torch.float32, device=device),
                          torch.tensor(self.seeds, dtype=torch.int64, device=device), self.router, self.filters,
                          self.want_probs)


@dataclass
class StepResult:
    """One model step, per row of its batch (aligned with the sequences it was given)."""

    tokens: List[Optional[int]]  # the model's choice; None for rows whose head did not run
    top_prob: List[Optional[float]]  # the model's top probability; None likewise
    router_score: Optional[List[float]]  # None when no router ran
    hidden: Optional[torch.Tensor] = None  # [B, H] pre-norm hidden of each row's last position
    # with HeadSpec.positions: per row, the tokens of its last n positions (oldest first;
    # tokens[i] is the last of them), and with want_probs their distributions [n, V]
    position_tokens: Optional[List[List[int]]] = None
    probs: Optional[List[torch.Tensor]] = None

    def fill(self, idx: Seq[int], tokens: Seq[int], top_prob: Seq[float]) -> None:
        """Put the head's choices for rows idx (a later head call on the same step)."""
        for i, t, p in zip(idx, tokens, top_prob):
            self.tokens[i], self.top_prob[i] = t, p
