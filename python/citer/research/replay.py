"""Record what a routing method did, request by request, and replay it at other model sizes.

A trace is, per request, the sequence of the engine's choices: at each SLM step whether
the LLM was called, and at each LLM call that verified tentative tokens how many of them
stood. Replaying a trace on another SLM/LLM pair (random weights at real shapes) makes
the engine do exactly the same work: the same forwards, catch-up lengths, rollbacks and
verifications, with that pair's costs. `record` and `replaying` patch the two places the
step loop takes its choices (the policies' decisions, RoutingStep.decide, and
verify.verify, as citer.engine.core calls it) and nothing else.
"""
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, List

import citer.engine.core as core_mod
from citer.engine.policies import RoutingStep


@dataclass
class Trace:
    prompt_len: int = 0
    new_tokens: int = 0
    calls: List[bool] = field(default_factory=list)  # per SLM step: was the LLM called
    kept: List[int] = field(default_factory=list)  # per verifying LLM call: tentative tokens that stood

    def to_json(self) -> dict:
        return {"calls": self.calls, "kept": self.kept}


def record_traces(engine, prompts, params) -> List[Trace]:
    """Run the prompts (one SamplingParams or one per prompt) and record each request's trace."""
    got: Dict[str, Trace] = {}
    with record(engine, got):
        outs = engine.generate(prompts, params)
    traces = []
    for o in outs:
        t = got.get(o.request_id, Trace())
        t.prompt_len, t.new_tokens = len(o.prompt_token_ids), len(o.token_ids)
        traces.append(t)
    return traces


@contextmanager
def record(engine, traces: Dict[str, Trace]):
    """Fill traces[request id] while the block runs."""
    core = engine.core
    slm_step, llm_step, verify = core._slm_step, core._llm_step, core_mod.verify
    pending: Dict[str, int] = {}  # request id -> index of its last SLM step's entry

    def slm_recorded(seqs, now):
        slm_step(seqs, now)
        for s in seqs:
            t = traces.setdefault(s.request_id, Trace())
            pending[s.request_id] = len(t.calls)
            t.calls.append(False)  # set True below when this step's LLM call includes it

    def llm_recorded(seqs):
        for s in seqs:
            i = pending.pop(s.request_id, None)
            if i is not None:
                traces[s.request_id].calls[i] = True
        return llm_step(seqs)

    def verify_recorded(seq, tokens, probs):
        kept, token = verify(seq, tokens, probs)
        traces.setdefault(seq.request_id, Trace()).kept.append(kept)
        return kept, token

    core._slm_step, core._llm_step, core_mod.verify = slm_recorded, llm_recorded, verify_recorded
    try:
        yield traces
    finally:
        del core._slm_step, core._llm_step  # back to the class's methods
        core_mod.verify = verify
        pending.clear()


@contextmanager
def replaying(traces: Dict[str, dict]):
    """While the block runs, requests whose id is in traces take their recorded choices:
    the LLM is called at the recorded SLM steps and the recorded number of tentative
    tokens stands at each verification (the LLM's token after them is whatever the
    replaying pair's LLM chose there)."""
    decide, verify = RoutingStep.decide, core_mod.verify
    cursor = defaultdict(lambda: [0, 0])

    def decide_replay(step, top_prob, router_score):
        out = []
        for s in step.seqs:
            c = cursor[s.request_id]
            calls = traces[s.request_id]["calls"]
            out.append(calls[c[0]] if c[0] < len(calls) else True)
            c[0] += 1
        return out

    def verify_replay(seq, tokens, probs):
        c = cursor[seq.request_id]
        kept_list = traces[seq.request_id]["kept"]
        kept = min(kept_list[c[1]] if c[1] < len(kept_list) else 0, seq.num_tentative)
        c[1] += 1
        return kept, tokens[kept]

    RoutingStep.decide, core_mod.verify = decide_replay, verify_replay
    try:
        yield
    finally:
        RoutingStep.decide, core_mod.verify = decide, verify
