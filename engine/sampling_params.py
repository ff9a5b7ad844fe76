"""SamplingParams: how one request is decoded and routed."""
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

POLICIES = ("router", "slm", "llm", "random", "confidence")


@dataclass
class SamplingParams:
    """Per-request decoding settings (vLLM-style names).

    policy: who makes each token. "router" (CITER: the router's score p < threshold sends
    the token to the LLM), "slm" / "llm" (one model only), "random" (each token goes to
    the LLM with probability llm_fraction) or "confidence" (the LLM when the SLM's top
    probability is under confidence_threshold). None: "router" when the engine has a
    router and an LLM, else "slm".
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    seed: Optional[int] = None
    stop: Optional[Union[str, Sequence[str]]] = None
    stop_token_ids: Optional[Sequence[int]] = None
    ignore_eos: bool = False
    policy: Optional[str] = None
    threshold: Optional[float] = None  # router τ; None: the router's own default
    llm_fraction: float = 0.0  # policy "random"
    confidence_threshold: float = 0.5  # policy "confidence"
    stop_list: List[str] = field(init=False, repr=False)

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"invalid SamplingParams: {msg}")

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not (self.temperature >= 0.0) or self.temperature != self.temperature:
            bad(f"temperature must be >= 0, got {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            bad(f"top_k must be -1, 0 (off) or a positive int, got {self.top_k!r}")
        if self.top_k == -1:
            self.top_k = 0
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            bad(f"seed must be a non-negative int, got {self.seed!r}")
        if self.policy is not None and self.policy not in POLICIES:
            bad(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.threshold is not None and not (0.0 <= self.threshold):
            bad(f"threshold must be >= 0, got {self.threshold!r}")
        if not (0.0 <= self.llm_fraction <= 1.0):
            bad(f"llm_fraction must be in [0, 1], got {self.llm_fraction!r}")
        if not (0.0 <= self.confidence_threshold <= 1.0):
            bad(f"confidence_threshold must be in [0, 1], got {self.confidence_threshold!r}")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in stop):
            bad(f"stop must be non-empty strings, got {self.stop!r}")
        self.stop_list = stop
        ids = list(self.stop_token_ids or [])
        if any(not isinstance(t, int) or t < 0 for t in ids):
            bad(f"stop_token_ids must be non-negative ints, got {self.stop_token_ids!r}")
        self.stop_token_ids = ids

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def filtered(self) -> bool:
        """True when top-k / top-p need the full logits row."""
        return not self.greedy and (self.top_k > 0 or self.top_p < 1.0)
