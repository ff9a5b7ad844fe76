"""What one step asks of a model's head (HeadSpec) and what a model step returns (StepResult).

A HeadSpec is built once per step and model from the step's sequences: per row the
temperature, this step's sampling seed (drawn from each sequence's own generator, so a
seeded request gives the same tokens in any batch, on any head path), the top-k / top-p
filters where some row has them, and the router to score the rows with. The model's
head (citer.engine.models.DecoderLM.head) makes the choices; StepResult carries them back per
row, aligned with the step's sequences.
"""
from dataclasses import dataclass, replace
from typing import List, Optional, Sequence as Seq, Tuple

import torch

from citer.kernels.sampling import NO_FILTER, Filter

from .models.head import HeadInputs
from .models.router import RouterParams


@dataclass(frozen=True)
class HeadSpec:
    temperature: List[float]  # per row, 0 = greedy (so are temperatures under MIN_TEMPERATURE)
    seeds: List[int]  # per row: this step's sampling seed (0 for greedy rows)
    filters: Optional[List[Filter]]  # per row (top_k, top_p, banned ids) when some row filters, else None
    router: Optional[RouterParams] = None  # score every row with this router
    positions: Optional[List[int]] = None  # per row: its last n positions get the head (None: 1 each)
    want_probs: Optional[List[bool]] = None  # per row: also its sampling distribution(s)
    want_logprobs: Optional[List[bool]] = None  # per row: also the log-softmax of its raw logits
    ban_rows: Optional[List[int]] = None  # with positions: per row, how many of its first positions the ban holds for

    @classmethod
    def for_seqs(cls, seqs: Seq, router: Optional[RouterParams] = None, positions: Optional[List[int]] = None,
                 want_probs: Optional[List[bool]] = None, bans: Optional[List[Tuple[int, ...]]] = None,
                 ban_rows: Optional[List[int]] = None) -> "HeadSpec":
        """Draws each sampling row's seed for this step (once per step and model). bans:
        per row the token ids it may not choose (a request under its min_tokens); with
        positions, only for the first ban_rows[i] of row i's positions."""
        temperature = [0.0 if s.params.greedy else s.params.temperature for s in seqs]
        seeds = [0 if s.params.greedy else s.next_sampling_seed() for s in seqs]
        bans = bans or [()] * len(seqs)
        rows = [((s.params.top_k, s.params.top_p) if s.params.filtered else (0, 1.0)) + (ban,)
                for s, ban in zip(seqs, bans)]
        filters = rows if any(f != NO_FILTER for f in rows) else None
        if positions is not None and all(n == 1 for n in positions):
            positions = None
        logprobs = [s.params.logprobs is not None for s in seqs]
        return cls(temperature, seeds, filters, router, positions, _any(want_probs), _any(logprobs),
                   ban_rows if positions is not None and filters is not None else None)

    def per_position(self) -> "HeadSpec":
        """One row per head position (each sequence's row repeated n times)."""
        if self.positions is None:
            return self
        rep = [i for i, n in enumerate(self.positions) for _ in range(n)]
        out = replace(self.rows(rep), positions=None, ban_rows=None)
        if self.ban_rows is not None and out.filters is not None:  # the ban ends where min_tokens is reached
            offset = [r for n in self.positions for r in range(n)]
            filters = [f if r < self.ban_rows[i] else f[:2] + ((),) for f, r, i in zip(out.filters, offset, rep)]
            out = replace(out, filters=filters if any(f != NO_FILTER for f in filters) else None)
        return out

    def rows(self, idx: Seq[int]) -> "HeadSpec":
        """The spec of a subset of rows."""
        filters = [self.filters[i] for i in idx] if self.filters is not None else None
        if filters is not None and all(f == NO_FILTER for f in filters):
            filters = None  # no row of the subset filters: the fused head can serve it
        pick = lambda xs: [xs[i] for i in idx] if xs is not None else None  # noqa: E731
        return HeadSpec(pick(self.temperature), pick(self.seeds), filters, self.router, pick(self.positions),
                        _any(pick(self.want_probs)), _any(pick(self.want_logprobs)), pick(self.ban_rows))

    def without_router(self) -> "HeadSpec":
        return replace(self, router=None)

    def inputs(self, device: torch.device) -> HeadInputs:
        return HeadInputs(torch.tensor(self.temperature, dtype=torch.float32, device=device),
                          torch.tensor(self.seeds, dtype=torch.int64, device=device), self.router, self.filters,
                          self.want_probs, self.want_logprobs)


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
    logprobs: Optional[List[torch.Tensor]] = None  # like probs: log-softmax rows (want_logprobs)

    def fill(self, idx: Seq[int], tokens: Seq[int], top_prob: Seq[float],
             logprobs: Optional[torch.Tensor] = None) -> None:
        """Put the head's choices for rows idx (a later head call on the same step)."""
        for i, t, p in zip(idx, tokens, top_prob):
            self.tokens[i], self.top_prob[i] = t, p
        if logprobs is not None:
            if self.logprobs is None:
                self.logprobs = [None] * len(self.tokens)
            for j, i in enumerate(idx):
                self.logprobs[i] = logprobs[j:j + 1]


def _any(flags: Optional[List[bool]]) -> Optional[List[bool]]:
    return flags if flags is not None and any(flags) else None
