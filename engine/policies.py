"""Routing policies: who makes each token of a request, as objects the core asks.

A request's policy is made once, at intake (`make_policy`, which also refuses a policy
the engine cannot serve), and owns its decision and what the core needs to know of it:

  decide(seq, top_prob, score)  this step, does the LLM make (or, for "speculative",
                                verify up to) this row's token?
  uses_slm / uses_llm           which models the request runs
  head_first                    the decision reads the SLM's head (its top probability),
                                or the SLM's token stands whatever the signals say: on an
                                unfused head its lm_head runs before the decision, the
                                others' only for the rows the SLM keeps (an early exit)
  reads_router                  the decision reads the router's score (reported per token)
  tentative                     SLM tokens wait for the LLM's check before they commit
                                (speculative drafts; check-and-correct with verify=True)
  drafts                        the SLM's token stands as a draft even in a step that
                                calls the LLM, which then verifies it ("speculative")

Policies:
  slm         never the LLM
  llm         every token (such requests never reach the SLM step)
  router      the LLM when the router's score p < the request's threshold τ (CITER)
  random      the LLM when the row's uniform draw u < llm_fraction (draws from the
              request's own generator: a seed gives one output)
  confidence  the LLM when the SLM's top probability < confidence_threshold (FS-GEN/BiLD)
  speculative the SLM drafts; the LLM verifies once there are num_draft_tokens drafts, or
              at once when the SLM's top probability is under draft_confidence (adaptive
              draft length, as in BiLD / SpecDec++)
"""
from typing import List, Optional, Sequence as Seq

import numpy as np

from .sampling_params import VERIFIABLE, SamplingParams


class Policy:
    name = ""
    uses_slm = True
    uses_llm = True
    head_first = False
    reads_router = False
    drafts = False

    def __init__(self, verify: bool = False):
        self.verify = verify

    @property
    def tentative(self) -> bool:
        return self.verify or self.drafts

    def decide(self, seq, top_prob: Optional[float], score: Optional[float]) -> bool:
        raise NotImplementedError


class SLMOnly(Policy):
    name, uses_llm, head_first = "slm", False, True

    def decide(self, seq, top_prob, score) -> bool:
        return False


class LLMOnly(Policy):
    name, uses_slm = "llm", False

    def decide(self, seq, top_prob, score) -> bool:
        return True


class Router(Policy):
    name, reads_router = "router", True

    def __init__(self, threshold: float, verify: bool = False):
        super().__init__(verify)
        self.threshold = threshold

    def decide(self, seq, top_prob, score) -> bool:
        if score is None:
            raise RuntimeError("policy 'router' but no router score was computed")
        return score < self.threshold


class Random(Policy):
    name = "random"

    def __init__(self, llm_fraction: float, seed: int, verify: bool = False):
        super().__init__(verify)
        self.llm_fraction = llm_fraction
        self.rng = np.random.default_rng(seed)  # one draw per SLM step of the request

    def decide(self, seq, top_prob, score) -> bool:
        return float(self.rng.random()) < self.llm_fraction


class Confidence(Policy):
    name, head_first = "confidence", True

    def __init__(self, threshold: float, verify: bool = False):
        super().__init__(verify)
        self.threshold = threshold

    def decide(self, seq, top_prob, score) -> bool:
        if top_prob is None:
            raise RuntimeError("policy 'confidence' but the SLM's head did not run")
        return top_prob < self.threshold


class Speculative(Policy):
    name, head_first, drafts = "speculative", True, True

    def __init__(self, num_draft_tokens: int, draft_confidence: Optional[float]):
        super().__init__(False)
        self.num_draft_tokens, self.draft_confidence = num_draft_tokens, draft_confidence

    def decide(self, seq, top_prob, score) -> bool:
        """This row's draft is made: is it the last before the LLM checks?"""
        dc = self.draft_confidence
        return seq.num_tentative + 1 >= self.num_draft_tokens or (dc is not None and top_prob < dc)


def make_policy(params: SamplingParams, seed: int, has_slm: bool, has_llm: bool, router) -> Policy:
    """The request's policy (its own, or the engine's default: "router" with a router and
    an LLM, else "slm" with an SLM, else "llm"); raises ValueError, naming the problem,
    unless this engine can serve it. router: the engine's router (None without one)."""
    name = params.policy or ("router" if router is not None and has_llm else "slm" if has_slm else "llm")
    if name != "llm" and not has_slm:
        raise ValueError(f"policy {name!r} needs an SLM")
    if name != "slm" and not has_llm:
        raise ValueError(f"policy {name!r} needs an LLM, and this engine has none")
    if params.verify and name not in VERIFIABLE:
        raise ValueError(f"verify=True applies to the policies {VERIFIABLE}, and this request's policy is {name!r}")
    if name == "router":
        if router is None:
            raise ValueError("policy 'router' needs a router, and this engine has none")
        threshold = params.threshold if params.threshold is not None else router.default_threshold
        if threshold is None:
            raise ValueError("policy 'router' needs a threshold")
        return Router(threshold, params.verify)
    if name == "random":
        return Random(params.llm_fraction, seed, params.verify)
    if name == "confidence":
        return Confidence(params.confidence_threshold, params.verify)
    if name == "speculative":
        return Speculative(params.num_draft_tokens, params.draft_confidence)
    return SLMOnly() if name == "slm" else LLMOnly()


class RoutingStep:
    """The policies of one SLM step's rows, as the model runner asks them: which rows need
    the head before their decision, and the decisions (one per row, in order).
    always_head: rows that need the SLM's token whatever the decision (check-and-correct
    with deferred LLM calls keeps it tentatively)."""

    def __init__(self, seqs: Seq, always_head: Optional[Seq[bool]] = None):
        self.seqs = seqs
        self.head_first = [s.policy.head_first or bool(always_head and always_head[i]) for i, s in enumerate(seqs)]

    def decide(self, top_prob: Seq[Optional[float]], scores: Optional[Seq[Optional[float]]]) -> List[bool]:
        """top_prob: None for rows whose head did not run yet (not head_first)."""
        return [s.policy.decide(s, top_prob[i], scores[i] if scores is not None else None)
                for i, s in enumerate(self.seqs)]
