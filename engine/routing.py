"""Routing policies: who makes the next token of a sequence."""
import math

from .sequence import Sequence


def needs_slm(seq: Sequence) -> bool:
    return seq.policy != "llm"


def route_to_llm(seq: Sequence, top_prob: float, router_score: float) -> bool:
    """-> True when the LLM makes this token (the SLM's proposal is dropped)."""
    policy = seq.policy
    if policy == "slm":
        return False
    if policy == "llm":
        return True
    if policy == "router":
        if math.isnan(router_score):
            raise RuntimeError("policy 'router' but no router score was computed")
        return router_score < seq.threshold
    if policy == "random":
        return bool(seq.route_rng.random() < seq.params.llm_fraction)
    if policy == "confidence":
        return top_prob < seq.params.confidence_threshold
    raise ValueError(f"unknown policy {policy!r}")
