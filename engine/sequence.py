"""Sequence: one request's state inside the engine, and SeqStats, its counters.

The core (core.py) is the one writer of a running sequence's state: it appends tokens,
records what each model computed (from the runners' results), commits, rolls back
(through the scheduler, which also shrinks the block table) and finishes it.
"""
from dataclasses import dataclass, fields
from typing import Dict, List, Optional

import torch

from .policies import Policy
from .sampling_params import SamplingParams


def capped_len(num_prompt_tokens: int, max_tokens: int, max_model_len: int) -> int:
    """The length a request may reach: prompt + max_tokens, capped at max_model_len."""
    return min(num_prompt_tokens + max_tokens, max_model_len)


@dataclass
class SeqStats:
    """Per-request counters (RequestOutput.stats holds them with derived rates)."""

    slm_forward_tokens: int = 0  # positions the SLM computed
    llm_forward_tokens: int = 0
    llm_calls: int = 0  # LLM steps this request took part in
    slm_discarded_tokens: int = 0  # computed positions a rollback discarded
    llm_discarded_tokens: int = 0
    drafted: int = 0  # speculative: draft tokens made
    accepted: int = 0  # speculative: drafts the LLM accepted
    corrected: int = 0  # tentative policies: rollbacks (a rejected token replaced by the LLM's)
    slm_time: float = 0.0  # profile=True: this request's share of each phase's time
    router_time: float = 0.0
    llm_time: float = 0.0
    other_time: float = 0.0

    def as_dict(self, policy: Policy, profiled: bool) -> Dict[str, float]:
        keep = {"slm_forward_tokens", "llm_forward_tokens", "llm_calls", "slm_discarded_tokens",
                "llm_discarded_tokens"}
        if policy.drafts:
            keep |= {"drafted", "accepted"}
        if policy.tentative:
            keep.add("corrected")
        if profiled:
            keep |= {"slm_time", "router_time", "llm_time", "other_time"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in keep}


class Sequence:
    """Token ids (prompt + generated), what each model has in its KV cache, routing log.

    Positions [0, num_computed["slm"]) are in the SLM's cache, [0, num_computed["llm"])
    in the LLM's; both index the one block table behind `handle`. Tokens [0, committed)
    are final; later ones are tentative (a speculative draft, or an SLM token that
    check-and-correct has not verified yet) and may be rolled back (`truncate`), which
    sets both computed counts back and counts what each model computed and discarded.
    Tokens [0, emitted) have been sent to the request's owner as events; an output holds
    exactly those. Invariant: a model computes a position again only after a rollback
    changed its token.
    """

    def __init__(self, request_id: str, prompt_token_ids: List[int], params: SamplingParams, policy: Policy,
                 seed: int, max_model_len: int, max_llm_wait: int = 0):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.token_ids = list(prompt_token_ids)
        self.params = params
        self.policy = policy
        self.max_len = capped_len(len(prompt_token_ids), params.max_tokens, max_model_len)
        self.finish_reason: Optional[str] = None
        self.handle: Optional[int] = None  # block-manager handle while running
        self.reserved_blocks = 0  # blocks this sequence may still need (admission budget)
        self.num_computed = {"slm": 0, "llm": 0}  # per model: positions in its KV cache
        self.committed = len(prompt_token_ids)  # tokens [0, committed) can no longer change
        self.emitted = len(prompt_token_ids)  # tokens [0, emitted) have had their event
        self.from_llm: List[bool] = []  # per generated token
        self.router_scores: List[Optional[float]] = []  # per generated token
        self.logprobs: List[Optional[object]] = []  # per generated token: a TokenLogprob (SamplingParams.logprobs)
        self.index = 0  # which of its prompt's n samples (SamplingParams.n)
        self.group: Optional[list] = None  # n > 1: the samples of one prompt, admitted together
        self.draft_probs: Dict[int, torch.Tensor] = {}  # position -> the SLM's distribution of its tentative token
        self.text = ""  # detokenized emitted output so far (stop strings cut)
        self.detok = None  # the detokenizer's state (detokenizer.DetokState)
        self.sampler = torch.Generator(device="cpu").manual_seed(seed)  # per-step sampling seeds, verification
        self.stats = SeqStats()
        # deferred LLM calls (Scheduler.wait_for_llm): the step this row first needed the
        # LLM (None: it does not now); parked rows wait for the LLM's token and do not advance
        self.max_llm_wait = params.max_llm_wait if params.max_llm_wait is not None else max_llm_wait
        self.llm_since: Optional[int] = None
        self.parked = False
        self.routed_score: Optional[float] = None  # the router score that parked it

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tentative(self) -> int:
        return len(self.token_ids) - self.committed

    def min_tokens_left(self, n: int) -> int:
        """How many more generated tokens SamplingParams.min_tokens asks for once the
        sequence holds n tokens (> 0: nothing but its length may end it yet)."""
        return max(0, self.params.min_tokens - (n - self.num_prompt_tokens))

    def append(self, token: int, from_llm: bool, score: Optional[float], commit: bool, logprob=None) -> None:
        self.token_ids.append(token)
        self.from_llm.append(from_llm)
        self.router_scores.append(score)
        self.logprobs.append(logprob)
        if commit:
            self.committed = len(self.token_ids)

    def record_forward(self, model: str, start: int, end: int) -> None:
        """A model computed positions [start, end) (a runner's StepResult.spans)."""
        self.num_computed[model] = end
        if model == "slm":
            self.stats.slm_forward_tokens += end - start
        else:
            self.stats.llm_forward_tokens += end - start

    def truncate(self, n: int) -> None:
        """Drop the tokens from position n on (never committed ones): both models' caches
        end at n at most; what they had computed past it counts as discarded. The block
        table is the scheduler's to shrink (Scheduler.truncate)."""
        if n < self.committed:
            raise ValueError(f"cannot roll back committed tokens (to {n}, {self.committed} committed)")
        del self.token_ids[n:]
        keep = n - self.num_prompt_tokens
        del self.from_llm[keep:]
        del self.router_scores[keep:]
        del self.logprobs[keep:]
        for model, computed in self.num_computed.items():
            if computed > n:
                if model == "slm":
                    self.stats.slm_discarded_tokens += computed - n
                else:
                    self.stats.llm_discarded_tokens += computed - n
                self.num_computed[model] = n
        self.draft_probs = {p: q for p, q in self.draft_probs.items() if p < n}

    def next_sampling_seed(self) -> int:
        return int(torch.randint(0, 2**62, (1,), generator=self.sampler, device="cpu"))
