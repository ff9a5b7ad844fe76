"""What one step asks of a model's head, built from its sequences, and what the step returns.

`head_spec` builds the HeadSpec of a step (citer.engine.models.head) once per step and
model: one row per head position (a sequence's last position, or its last
head_tokens[i] positions when the LLM verifies tentative tokens), with per row the
temperature, this step's sampling seed (drawn once per sequence from its own generator,
so a seeded request gives the same tokens in any batch, on any head path), the top-k /
top-p filters and banned ids where some row has them, and the router to score the rows
with. The runner returns a StepResult: the head's choices per sequence, aligned with the
step's sequences, and the positions each sequence had computed.
"""
from dataclasses import dataclass, field
from typing import List, Optional, Sequence as Seq, Tuple

import torch

from .models.head import HeadSpec, any_true, only_filtering
from .models.router import RouterParams


def head_spec(seqs: Seq, router: Optional[RouterParams] = None, head_tokens: Optional[List[int]] = None,
              want_probs: Optional[List[bool]] = None, bans: Optional[List[Tuple[int, ...]]] = None,
              ban_rows: Optional[List[int]] = None) -> HeadSpec:
    """seqs -> the step's HeadSpec, head_tokens[i] rows for sequence i (None: one each).
    bans: per sequence the ids it may not choose (a request under its min_tokens), for its
    first ban_rows[i] head rows (None: all of them). want_probs: per sequence, also the
    sampling distribution of each of its rows."""
    n = head_tokens or [1] * len(seqs)
    temperature, seeds, filters, probs, logprobs = [], [], [], [], []
    for i, s in enumerate(seqs):
        p = s.params
        t = 0.0 if p.greedy else p.temperature
        seed = 0 if p.greedy else s.next_sampling_seed()
        kp = (p.top_k, p.top_p) if p.filtered else (0, 1.0)
        ban = bans[i] if bans is not None else ()
        for r in range(n[i]):
            temperature.append(t)
            seeds.append(seed)
            filters.append(kp + (ban if ban_rows is None or r < ban_rows[i] else (),))
            probs.append(bool(want_probs and want_probs[i]))
            logprobs.append(p.logprobs is not None)
    return HeadSpec(temperature, seeds, only_filtering(filters), router, any_true(probs), any_true(logprobs))


@dataclass
class StepResult:
    """One model step, per sequence of its batch (aligned with the sequences it was given)."""

    tokens: List[Optional[int]]  # the model's choice; None for rows the early exit sent to the LLM
    top_prob: List[Optional[float]]  # the model's top probability; None likewise
    router_score: Optional[List[float]]  # None when no router ran
    spans: List[Tuple[int, int]] = field(default_factory=list)  # positions [start, end) computed, per sequence
    to_llm: Optional[List[bool]] = None  # the SLM step's routing decisions (RoutingStep), per sequence
    # with head_tokens: per sequence, the tokens of its last n positions (oldest first;
    # tokens[i] is the last of them), and with want_probs their distributions [n, V]
    position_tokens: Optional[List[List[int]]] = None
    probs: Optional[List[torch.Tensor]] = None
    logprobs: Optional[List[torch.Tensor]] = None  # like probs: log-softmax rows (want_logprobs)

    @classmethod
    def empty(cls, n: int) -> "StepResult":
        return cls([None] * n, [None] * n, None)

    def fill(self, idx: Seq[int], tokens: Seq[int], top_prob: Seq[float],
             logprobs: Optional[torch.Tensor] = None) -> None:
        """Put the head's choices for rows idx (one-row-per-sequence steps)."""
        for i, t, p in zip(idx, tokens, top_prob):
            self.tokens[i], self.top_prob[i] = t, p
        if logprobs is not None:
            if self.logprobs is None:
                self.logprobs = [None] * len(self.tokens)
            for j, i in enumerate(idx):
                self.logprobs[i] = logprobs[j:j + 1]
