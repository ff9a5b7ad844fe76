"""Routing policies: who makes the next token of each sequence, from the SLM step's signals.

`decide` is the one place the policies live: a pure function over lists aligned with
the step's SLM batch (no model, no random state: the "random" policy's uniform draws
come in as a signal, drawn by `draws` from each sequence's own generator).

Policies, per row:
  slm         never the LLM
  router      the LLM when the router's score p < the request's threshold τ (CITER)
  random      the LLM when the row's draw u < llm_fraction
  confidence  the LLM when the SLM's top probability < confidence_threshold (FS-GEN/BiLD)
  speculative the SLM's token is a draft; the LLM (verifying the drafts) once there are
              num_draft_tokens of them, or at once when the SLM's top probability is
              under draft_confidence (adaptive draft length, as in BiLD / SpecDec++)
  llm         every token (such rows never reach the SLM step: needs_slm)

`needs_head_first` says which rows need the SLM's head before their decision: the others
are decided before its lm_head, which then runs only for the rows the SLM keeps (the
early exit of an unfused head, EngineCore._slm_step).
"""
from typing import List, Optional, Sequence as Seq

from .sequence import Sequence

def needs_slm(seq: Sequence) -> bool:
    return seq.policy != "llm"


def needs_head_first(policy: str) -> bool:
    """True when the SLM's head must run before this row's decision: the decision reads
    the SLM's top probability ("confidence"), or the SLM's token is kept whatever the
    signals say ("slm")."""
    return policy in ("confidence", "slm", "speculative")


def draws(seqs: Seq[Sequence]) -> List[Optional[float]]:
    """This step's uniform draw per row for the "random" policy (None for other rows)."""
    return [float(s.route_rng.random()) if s.policy == "random" else None for s in seqs]


def decide(seqs: Seq[Sequence], top_prob: Seq[Optional[float]], router_score: Optional[Seq[Optional[float]]],
           draw: Seq[Optional[float]]) -> List[bool]:
    """-> per row, True when the LLM is called this step: it makes this token (the SLM's
    proposal is dropped), or for "speculative" verifies the drafts, this row's included.
    top_prob may be None for rows whose policy does not read it (see needs_head_first)."""
    out = []
    for i, seq in enumerate(seqs):
        policy = seq.policy
        if policy == "slm":
            out.append(False)
        elif policy == "llm":
            out.append(True)
        elif policy == "router":
            score = router_score[i] if router_score is not None else None
            if score is None:
                raise RuntimeError("policy 'router' but no router score was computed")
            out.append(score < seq.threshold)
        elif policy == "random":
            out.append(draw[i] < seq.params.llm_fraction)
        elif policy == "speculative":  # this row's draft is made: is it the last before the LLM checks?
            dc = seq.params.draft_confidence
            out.append(seq.num_tentative + 1 >= seq.params.num_draft_tokens
                       or (dc is not None and top_prob[i] < dc))
        elif policy == "confidence":
            if top_prob[i] is None:
                raise RuntimeError("policy 'confidence' but the SLM's head did not run")
            out.append(top_prob[i] < seq.params.confidence_threshold)
        else:
            raise ValueError(f"unknown policy {policy!r}")
    return out
