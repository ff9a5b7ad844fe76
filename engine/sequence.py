"""Sequence: one request's state inside the engine."""
import enum
import time
from typing import Dict, List, Optional

import numpy as np
import torch

from .sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Token ids (prompt + generated), what each model has in its KV cache, routing log.

    Positions [0, num_computed["slm"]) are in the SLM's cache, [0, num_computed["llm"])
    in the LLM's; both index the one block table behind `handle`. Tokens [0, committed)
    are final; later ones are tentative (a speculative draft, or an SLM token that
    check-and-correct has not verified yet) and may be rolled back (`truncate`), which
    sets both computed counts back and counts what each model computed and discarded.
    Invariant: a model computes a position again only after a rollback changed its token.
    """

    def __init__(self, request_id: str, prompt_token_ids: List[int], params: SamplingParams,
                 policy: str, threshold: Optional[float], seed: int):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.token_ids = list(prompt_token_ids)
        self.params = params
        self.policy = policy
        self.threshold = threshold
        self.status = Status.WAITING
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
        self.text = ""  # detokenized committed output so far (stop strings cut)
        self.detok = None  # the detokenizer's state (detokenizer.DetokState)
        self.sampler = torch.Generator(device="cpu").manual_seed(seed)  # draws per-step sampling seeds
        self.route_rng = np.random.default_rng(seed)  # policy "random"
        self.stats = {"slm_forward_tokens": 0, "llm_forward_tokens": 0, "llm_calls": 0,
                      "slm_discarded_tokens": 0, "llm_discarded_tokens": 0}
        if policy == "speculative":
            self.stats.update(drafted=0, accepted=0)
        self.arrival_time = time.perf_counter()

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> List[int]:
        """The committed generated tokens (what outputs and streams carry)."""
        return self.token_ids[self.num_prompt_tokens:self.committed]

    @property
    def num_tentative(self) -> int:
        return len(self.token_ids) - self.committed

    @property
    def max_len(self) -> int:
        """The length this request may reach: prompt + max_tokens (the engine caps it at max_model_len)."""
        return self.num_prompt_tokens + self.params.max_tokens

    @property
    def tentative(self) -> bool:
        """True when this request's SLM tokens wait for the LLM's check before they commit."""
        return self.policy == "speculative" or self.params.verify

    def append(self, token: int, from_llm: bool, score: Optional[float], commit: bool, logprob=None) -> None:
        self.token_ids.append(token)
        self.from_llm.append(from_llm)
        self.router_scores.append(score)
        self.logprobs.append(logprob)
        if commit:
            self.committed = len(self.token_ids)

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
                self.stats[f"{model}_discarded_tokens"] += computed - n
                self.num_computed[model] = n
        self.draft_probs = {p: q for p, q in self.draft_probs.items() if p < n}

    def next_sampling_seed(self) -> int:
        return int(torch.randint(0, 2**62, (1,), generator=self.sampler, device="cpu"))
