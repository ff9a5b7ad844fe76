"""Sequence: one request's state inside the engine."""
import enum
import time
from typing import List, Optional

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
    in the LLM's; both index the one block table behind `handle`. Invariant: each model
    computes each position at most once, so num_computed only grows.
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
        self.from_llm: List[bool] = []
        self.router_scores: List[Optional[float]] = []
        self.text = ""  # detokenized output so far (stop strings cut)
        self.sampler = torch.Generator(device="cpu").manual_seed(seed)  # draws per-step sampling seeds
        self.route_rng = np.random.default_rng(seed)  # policy "random"
        self.stats = {"slm_forward_tokens": 0, "llm_forward_tokens": 0, "llm_calls": 0}
        self.arrival_time = time.perf_counter()

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> List[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def next_sampling_seed(self) -> int:
        return int(torch.randint(0, 2**62, (1,), generator=self.sampler, device="cpu"))
