"""The engine's pieces on their own, without models: each policy's decision and its
checks, the scheduler's admission and truncation, verification of tentative tokens, the
inbox; and, with the tiny models, what only a step shows: a failed request's output holds
exactly what its owner was sent, the LLM's ban on ending ends with min_tokens, and
profiling times the path it profiles."""
from types import SimpleNamespace

import pytest
import torch

from citer import Engine, SamplingParams
from citer._C import BlockManager
from citer.engine.config import EngineConfig
from citer.engine.inbox import STEP_API, Inbox
from citer.engine.outputs import TokenEvent
from citer.engine.policies import (LLMOnly, Random, RoutingStep, SLMOnly, Speculative, make_policy)
from citer.engine.scheduler import Scheduler
from citer.engine.sequence import Sequence
from citer.engine.verify import verify
from conftest import random_prompts

ROUTER = SimpleNamespace(default_threshold=0.4)


def seq(prompt=(5, 6, 7), policy=None, seed=0, max_model_len=64, **params) -> Sequence:
    p = SamplingParams(**params)
    return Sequence("s", list(prompt), p, policy or make_policy(p, seed, True, True, ROUTER), seed, max_model_len)


# ---- policies ----------------------------------------------------------------------------
def test_each_policy_decides_by_its_own_rule():
    r = make_policy(SamplingParams(policy="router", threshold=0.3), 0, True, True, ROUTER)
    assert (r.name, r.threshold) == ("router", 0.3) and r.reads_router and not r.head_first
    assert r.decide(None, None, 0.29) and not r.decide(None, None, 0.3)
    assert make_policy(SamplingParams(policy="router"), 0, True, True, ROUTER).threshold == 0.4  # the router's default
    with pytest.raises(RuntimeError, match="no router score"):
        r.decide(None, 0.9, None)
    c = make_policy(SamplingParams(policy="confidence", confidence_threshold=0.6), 0, True, True, None)
    assert c.head_first and c.decide(None, 0.59, None) and not c.decide(None, 0.6, None)
    assert not SLMOnly().decide(None, 0.0, 0.0) and LLMOnly().decide(None, 1.0, 1.0)
    assert not LLMOnly().uses_slm and not SLMOnly().uses_llm
    # random: seeded draws, about the asked fraction, the same sequence for the same seed
    draws = [Random(0.25, 7).decide(None, None, None) for _ in range(1)]
    a, b = Random(0.25, 7), Random(0.25, 7)
    da, db = [a.decide(None, None, None) for _ in range(2000)], [b.decide(None, None, None) for _ in range(2000)]
    assert da == db and 0.2 < sum(da) / 2000 < 0.3 and draws[0] == da[0]
    # speculative: the LLM once num_draft_tokens drafts wait (this one included), or under draft_confidence
    sp = Speculative(3, 0.5)
    assert sp.drafts and sp.tentative and sp.head_first
    s = seq(policy=sp)
    assert not sp.decide(s, 0.9, None)
    s.append(9, False, None, commit=False)
    assert not sp.decide(s, 0.9, None) and sp.decide(s, 0.4, None)
    s.append(9, False, None, commit=False)
    assert sp.decide(s, 0.9, None)
    # verify makes the routed policies tentative
    assert make_policy(SamplingParams(policy="random", verify=True), 0, True, True, None).tentative


def test_the_default_policy_and_what_an_engine_cannot_serve():
    p = SamplingParams()
    assert make_policy(p, 0, True, True, ROUTER).name == "router"
    assert make_policy(p, 0, True, True, None).name == "slm"
    assert make_policy(p, 0, False, True, None).name == "llm"
    cases = [(SamplingParams(policy="slm"), (False, True, None), "needs an SLM"),
             (SamplingParams(policy="confidence"), (True, False, None), "needs an LLM"),
             (SamplingParams(policy="router"), (True, True, None), "needs a router"),
             (SamplingParams(policy="router", verify=True), (True, True, None), "needs a router")]
    for params, (has_slm, has_llm, router), msg in cases:
        with pytest.raises(ValueError, match=msg):
            make_policy(params, 0, has_slm, has_llm, router)


def test_routing_step_asks_each_rows_policy_once():
    seqs = [seq(policy=make_policy(SamplingParams(policy=p), 0, True, True, ROUTER)) for p in
            ("router", "confidence", "slm", "llm")]
    step = RoutingStep(seqs)
    assert step.head_first == [False, True, True, False]
    assert step.decide([None, 0.1, 0.2, None], [0.1, 0.9, 0.9, 0.9]) == [True, True, False, True]


# ---- scheduler -----------------------------------------------------------------------------
def _scheduler(num_blocks=8, block_size=4, max_num_seqs=3, max_model_len=32):
    config = EngineConfig("cpu", block_size, num_blocks, max_model_len, max_num_seqs=max_num_seqs)
    return Scheduler(config, BlockManager(num_blocks, block_size))


def test_admission_reserves_the_blocks_a_request_may_need():
    sch = _scheduler()
    a, b, c = (seq(max_tokens=9, policy=SLMOnly(), max_model_len=32) for _ in range(3))  # 3 + 9 = 12: 3 blocks
    for i, s in enumerate((a, b, c)):
        s.request_id = f"r{i}"
        sch.add(s)
    assert sch.schedule() == [a, b]  # 6 of 8 blocks reserved; c would need 3 more
    assert list(sch.waiting) == [c] and sch.get("r2") is c
    sch.finish(a, "stop")
    assert sch.schedule() == [b, c] and a.handle is None and sch.get("r0") is None
    sch.check_fits(3, 30, 1)  # 33 tokens, capped at max_model_len 32: 8 blocks, the whole pool
    with pytest.raises(ValueError, match="needs 24 blocks of 4 tokens for its 3 samples"):
        sch.check_fits(30, 2, 3)


def test_capped_length_and_truncation_free_blocks():
    sch = _scheduler(num_blocks=16)
    s = seq(max_tokens=100, policy=SLMOnly(), max_model_len=20)
    assert s.max_len == 20  # capped once, here
    sch.add(s)
    sch.schedule()
    for t in range(10):
        s.append(t, False, None, commit=t < 2)
    sch.ensure_slots(s)
    used = sch.bm.num_blocks - sch.bm.num_free_blocks
    s.num_computed = {"slm": 13, "llm": 6}
    sch.truncate(s, 6)  # 3 prompt + 2 committed + 1 tentative kept
    assert len(s) == 6 and s.num_computed == {"slm": 6, "llm": 6}
    assert s.stats.slm_discarded_tokens == 7 and s.stats.llm_discarded_tokens == 0
    assert sch.bm.num_blocks - sch.bm.num_free_blocks == used - 2  # 13 -> 6 tokens: 4 -> 2 blocks
    with pytest.raises(ValueError, match="cannot roll back committed"):
        s.truncate(4)


# ---- verification ----------------------------------------------------------------------------
def test_greedy_verification_keeps_the_agreeing_prefix():
    s = seq(policy=Speculative(4, None))
    for t in (10, 11, 12):
        s.append(t, False, None, commit=False)
    assert verify(s, [10, 11, 12, 13], None) == (3, 13)  # all stand, the LLM's next token follows
    assert verify(s, [10, 99, 12, 13], None) == (1, 99)  # the first disagreement is replaced


def test_sampled_verification_accepts_by_the_probability_ratio():
    vocab = 6
    s = seq(policy=Speculative(4, None), temperature=1.0, seed=3)
    s.append(2, False, None, commit=False)
    q = torch.full((vocab,), 1.0 / vocab)
    s.draft_probs[len(s) - 1] = q
    same = torch.stack([q, q])
    assert verify(s, [0, 0], same)[0] == 1  # p == q: every draft stands
    p = torch.zeros(2, vocab)
    p[:, 4] = 1.0  # the LLM never makes token 2: rejected, and the replacement comes from (p - q)+, i.e. token 4
    assert verify(s, [4, 4], p) == (0, 4)


# ---- inbox -----------------------------------------------------------------------------------
def test_the_inbox_gives_each_owner_its_own_events_once():
    box, me = Inbox(), object()
    box.register("a", STEP_API)
    box.register("b", me)
    with pytest.raises(ValueError, match="already in the engine"):
        box.register("a", me)
    for rid, tok, fin in (("a", 1, None), ("b", 2, None), ("a", 3, "stop")):
        box.put(TokenEvent(rid, tok, "", False, None, fin))
    assert [e.token_id for e in box.take(me)] == [2] and box.take(me) == []
    assert [e.token_id for e in box.take(STEP_API)] == [1, 3]
    assert "a" not in box and "b" in box  # a's final event was taken: its id is free again
    box.put(TokenEvent("b", 4, "", False, None))
    box.drop("b")
    assert box.take(me) == [] and "b" not in box
    box.register("c", me)
    box.release(me)
    assert "c" not in box


# ---- what a step shows -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair(hf_models, router_path):
    return hf_models["qwen2"][0], hf_models["llama"][0], router_path


KW = dict(block_size=4, num_blocks=64, max_model_len=64)


def _drive(e, rids):
    """Step until every request ends; -> (events per request, final output per request)."""
    seen, finals = {r: [] for r in rids}, {}
    while len(finals) < len(rids):
        for ev in e.step():
            if ev.token_id is not None:
                seen[ev.request_id].append(ev.token_id)
            if ev.output is not None:
                finals[ev.request_id] = ev.output
    return seen, finals


def test_a_failed_request_holds_what_its_owner_was_sent(pair, monkeypatch):
    """The LLM forward fails in a step where the SLM already kept another request's token:
    that token was never sent, so the failed output does not hold it. Same for tokens past
    a detokenizer fault."""
    e = Engine(*pair, **KW)
    slm = e.add_request([5, 6, 7], SamplingParams(max_tokens=20, ignore_eos=True, policy="slm"))
    llm = e.add_request([8, 9], SamplingParams(max_tokens=20, ignore_eos=True, policy="llm"))
    sent = {slm: [], llm: []}
    for _ in range(3):
        for ev in e.step():
            sent[ev.request_id].append(ev.token_id)
    monkeypatch.setattr(e.core.llm, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("llm lost")))
    with pytest.raises(RuntimeError, match="llm lost"):
        e.step()  # the SLM keeps slm's 4th token, then the LLM raises: the step fails
    monkeypatch.undo()
    finals = {ev.request_id: ev.output for ev in e.step() if ev.output is not None}
    for rid in (slm, llm):
        assert finals[rid].finish_reason == "error" and finals[rid].token_ids == sent[rid] and len(sent[rid]) == 3
        assert len(finals[rid].from_llm) == len(finals[rid].router_scores) == 3
    # a detokenizer fault at the 3rd emitted token of a step that commits several (check-and-correct)
    update = e.core.detok.update

    def flaky(seq, upto, finishing, **kw):
        if upto - seq.num_prompt_tokens == 3:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "simulated")
        return update(seq, upto, finishing, **kw)

    monkeypatch.setattr(e.core.detok, "update", flaky)
    rid = e.add_request([5, 6, 7], SamplingParams(max_tokens=20, ignore_eos=True, policy="random", llm_fraction=0.2,
                                                  verify=True, seed=3))
    seen, finals = _drive(e, [rid])
    out = finals[rid]
    assert out.finish_reason == "error" and "simulated" in out.error
    assert out.token_ids == seen[rid] and len(out.token_ids) == 2 and out.text is not None
    assert e.block_manager.num_free_blocks == e.block_manager.num_blocks


def test_the_llm_may_end_a_request_once_min_tokens_are_made(hf_models):
    """A request under min_tokens cannot end; past it, the LLM's token may end it (the ban
    holds only for the positions under min_tokens, also on one-position catch-ups)."""
    llm = hf_models["llama"][0]
    e = Engine(llm, llm, block_size=4, num_blocks=64, max_model_len=64)
    prompt = random_prompts(1, 4, 4, seed=5)[0]
    free = e.generate([prompt], SamplingParams(max_tokens=40, policy="slm", ignore_eos=True))[0].token_ids
    eos = free[5]  # make the 6th token the end of the request
    e.core.eos_token_ids = {eos}
    for policy in ("slm", "llm"):
        out = e.generate([prompt], SamplingParams(max_tokens=40, policy=policy, min_tokens=2))[0]
        assert out.finish_reason == "stop" and out.token_ids == free[:6], policy


def test_profiling_keeps_the_path_and_times_the_router(pair):
    prompts = random_prompts(3, 3, 8, seed=2)
    params = SamplingParams(max_tokens=10, ignore_eos=True, policy="router", threshold=0.5)
    plain = Engine(*pair, **KW).generate(prompts, params)
    profiled = Engine(*pair, profile=True, **KW).generate(prompts, params)
    for a, b in zip(plain, profiled):
        assert (a.token_ids, a.from_llm, a.router_scores) == (b.token_ids, b.from_llm, b.router_scores)
        assert b.stats["slm_time"] > 0 and b.stats["router_time"] > 0 and "router_time" not in a.stats
