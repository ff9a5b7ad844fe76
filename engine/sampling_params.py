"""SamplingParams: how one request is decoded and routed."""
import numbers
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

from citer.kernels.sampling import MIN_TEMPERATURE

POLICIES = ("router", "slm", "llm", "random", "confidence", "speculative")
VERIFIABLE = ("router", "confidence", "random")  # the routed policies verify=True applies to
MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    """Per-request decoding settings (vLLM-style names).

    policy: who makes each token. "router" (CITER: the router's score p < threshold sends
    the token to the LLM), "slm" / "llm" (one model only), "random" (each token goes to
    the LLM with probability llm_fraction) or "confidence" (the LLM when the SLM's top
    probability is under confidence_threshold), or "speculative" (lossless: the SLM
    drafts num_draft_tokens tokens, or fewer when draft_confidence is set and its top
    probability falls under it, and the LLM verifies them all in one catch-up and makes
    one more; greedy output equals policy "llm", sampled output follows the LLM's
    distribution). None: "router" when the engine has a router and an LLM, else "slm".

    verify=True (router / confidence / random): each LLM call also checks the SLM tokens
    made since the previous one, rolls back at the first the LLM rejects and takes the
    LLM's token there (check-and-correct); those SLM tokens are held back from streams
    until checked.
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
    num_draft_tokens: int = 4  # policy "speculative": most drafts per LLM call
    draft_confidence: Optional[float] = None  # "speculative": stop drafting under this top probability
    verify: bool = False  # check-and-correct for router / confidence / random
    max_llm_wait: Optional[int] = None  # steps this request's LLM calls may wait to batch (None: the engine's)
    n: int = 1  # samples of this prompt (they share its KV blocks)
    logprobs: Optional[int] = None  # per emitted token: its logprob and the top-k (k <= 20), from the model that made it
    prompt_logprobs: Optional[int] = None  # not supported: an error when set
    min_tokens: int = 0  # no EOS / stop id / stop string ends the request before this many tokens
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True  # in the output text
    stop_list: List[str] = field(init=False, repr=False)

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"invalid SamplingParams: {msg}")

        def number(name, lo=None, hi=None, lo_open=False, optional=False):
            v = getattr(self, name)
            if v is None and optional:
                return
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or v != v:
                bad(f"{name} must be a number, got {v!r}")
            if (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and v > hi):
                where = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}{']' if hi is not None else ')'}"
                bad(f"{name} must be in {where}, got {v!r}")
            setattr(self, name, float(v))

        def integer(name, lo, hi=None, optional=False):
            v = getattr(self, name)
            if v is None and optional:
                return
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo or (hi is not None and v >= hi):
                bad(f"{name} must be an int >= {lo}{f' and < {hi}' if hi else ''}, got {v!r}")
            setattr(self, name, int(v))

        integer("max_tokens", 1)
        number("temperature", 0.0)
        number("top_p", 0.0, 1.0, lo_open=True)
        integer("top_k", -1)
        if self.top_k == -1:
            self.top_k = 0
        integer("seed", 0, 2**64, optional=True)  # what torch.Generator.manual_seed takes
        if self.policy is not None and self.policy not in POLICIES:
            bad(f"policy must be one of {POLICIES}, got {self.policy!r}")
        number("threshold", 0.0, optional=True)
        number("llm_fraction", 0.0, 1.0)
        number("confidence_threshold", 0.0, 1.0)
        integer("num_draft_tokens", 1)
        integer("n", 1, 129)
        integer("logprobs", 0, MAX_LOGPROBS + 1, optional=True)
        if self.prompt_logprobs is not None:
            bad("prompt_logprobs is not supported by citer (logprobs of generated tokens are)")
        integer("min_tokens", 0)
        integer("max_llm_wait", 0, optional=True)
        if self.min_tokens > self.max_tokens:
            bad(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        number("draft_confidence", 0.0, 1.0, optional=True)
        for flag in ("ignore_eos", "verify", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, flag), bool):
                bad(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if self.verify and self.policy is not None and self.policy not in VERIFIABLE:
            bad(f"verify=True applies to the policies {VERIFIABLE} (speculative always verifies), "
                f"not {self.policy!r}")
        if self.stop is not None and not isinstance(self.stop, (str, list, tuple)):
            bad(f"stop must be a string or a list of strings, got {self.stop!r}")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in stop):
            bad(f"stop must be non-empty strings, got {self.stop!r}")
        self.stop_list = stop
        ids = self.stop_token_ids
        if ids is not None and not isinstance(ids, (list, tuple)):
            bad(f"stop_token_ids must be a list of token ids, got {ids!r}")
        ids = list(ids or [])
        if any(isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0 for t in ids):
            bad(f"stop_token_ids must be non-negative ints, got {self.stop_token_ids!r}")
        self.stop_token_ids = [int(t) for t in ids]

    @property
    def greedy(self) -> bool:
        """Temperatures under MIN_TEMPERATURE decode greedily (logits / T would overflow)."""
        return self.temperature < MIN_TEMPERATURE

    @property
    def filtered(self) -> bool:
        """True when top-k / top-p need the full logits row."""
        return not self.greedy and (self.top_k > 0 or self.top_p < 1.0)
