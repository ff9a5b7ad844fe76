"""Deferred, batched LLM calls (EngineArgs max_llm_wait / llm_batch_min / llm_prefill):
deferral changes when the LLM runs, never what it makes (parking mode); no row waits
longer than its max_llm_wait; parked rows hold their blocks until they finish or are
aborted; nothing deadlocks when every running row waits; check-and-correct with deferral
keeps drafting and lets the LLM check later."""
import pytest

from citer import Engine, SamplingParams
from conftest import assert_all_free, hf_greedy, random_prompts

KW = dict(block_size=4, num_blocks=160, max_model_len=64)
POLICIES = [dict(policy="slm"), dict(policy="llm"), dict(policy="router", threshold=0.5),
            dict(policy="random", llm_fraction=0.3), dict(policy="confidence", confidence_threshold=0.6),
            dict(policy="speculative", num_draft_tokens=3)]
DEFERRAL = [dict(max_llm_wait=2), dict(max_llm_wait=5, llm_batch_min=3), dict(max_llm_wait=100, llm_batch_min=100),
            dict(max_llm_wait=3, llm_prefill="idle"), dict(max_llm_wait=3, llm_batch_min=4, llm_prefill="idle")]


@pytest.fixture(scope="module")
def pair(hf_models, router_path):
    return hf_models["qwen2"][0], hf_models["llama"][0], router_path


@pytest.fixture(scope="module")
def plain(pair):
    return Engine(*pair, **KW)


def _requests(n=8, seed=0, **extra):
    prompts = random_prompts(n, 3, 14, seed=seed)
    params = [SamplingParams(max_tokens=14, ignore_eos=True, seed=100 + i, **POLICIES[i % len(POLICIES)], **extra)
              for i in range(n)]
    return prompts, params


def _run_step_api(e, prompts, params, abort=(), arrive_every=1):
    """Requests arriving one per `arrive_every` steps, some aborted mid-run; checks after each
    step that no row has waited past its max_llm_wait. -> {index: output}."""
    ids, outs, i, steps = {}, {}, 0, 0
    while i < len(prompts) or e.has_unfinished_requests():
        if i < len(prompts) and steps % arrive_every == 0:
            ids[e.add_request(prompts[i], params[i])] = i
            i += 1
        for ev in e.step():
            if ev.output is not None:
                outs[ids[ev.request_id]] = ev.output
        steps += 1
        core = e.core
        for s in core.scheduler.llm_queue:
            assert core.steps - 1 - s.llm_since < s.max_llm_wait, "a row waited past its max_llm_wait"
        for j in abort:
            rid = next((r for r, k in ids.items() if k == j), None)
            if rid is not None and steps == 4 and j not in outs:
                out = e.abort(rid)
                if out is not None:
                    outs[j] = out
    return outs


@pytest.mark.parametrize("deferral", DEFERRAL)
def test_deferral_changes_when_not_what(pair, plain, deferral):
    prompts, params = _requests()
    ref = plain.generate(prompts, params)
    e = Engine(*pair, **KW, **deferral)
    got = e.generate(prompts, params)
    for r, g in zip(ref, got):
        assert (g.token_ids, g.from_llm) == (r.token_ids, r.from_llm)
        n = len(r.prompt_token_ids) + len(r.token_ids)
        assert g.stats["llm_forward_tokens"] <= n + g.stats["llm_discarded_tokens"]
        assert g.stats["slm_forward_tokens"] <= n + g.stats["slm_discarded_tokens"]
        assert (g.stats["llm_forward_tokens"], g.stats["slm_forward_tokens"]) == \
            (r.stats["llm_forward_tokens"], r.stats["slm_forward_tokens"])  # the same work, batched otherwise
    assert_all_free(e)
    # the step API, requests arriving over steps, two aborted mid-run (their tokens a prefix)
    outs = _run_step_api(e, prompts, params, abort=(1, 4))
    for i, r in enumerate(ref):
        o = outs[i]
        if o.finish_reason == "abort":
            assert o.token_ids == r.token_ids[:len(o.token_ids)]
        else:
            assert (o.token_ids, o.from_llm) == (r.token_ids, r.from_llm)
    assert_all_free(e)


def test_seeded_sampling_stays_seeded(pair, plain):
    prompts, params = _requests(temperature=0.9, top_p=0.95)
    ref = plain.generate(prompts, params)
    got = Engine(*pair, max_llm_wait=4, llm_batch_min=3, **KW).generate(prompts, params)
    assert [g.token_ids for g in got] == [r.token_ids for r in ref]


def test_deferral_batches_llm_calls(pair, plain):
    """With a wait, rows routed in different steps share LLM steps: fewer LLM steps for the
    same LLM calls per request."""
    prompts = random_prompts(12, 3, 10, seed=4)
    params = [SamplingParams(max_tokens=16, ignore_eos=True, policy="random", llm_fraction=0.2, seed=9 + i)
              for i in range(12)]  # each its own draws: routed in different steps
    counted = {}
    for name, e in (("now", plain), ("deferred", Engine(*pair, max_llm_wait=4, llm_batch_min=6, **KW))):
        run, steps = e.core.llm.run, []
        e.core.llm.run = lambda *a, **k: steps.append(len(a[0])) or run(*a, **k)
        try:
            outs = e.generate(prompts, params)
        finally:
            del e.core.llm.run
        counted[name] = (len(steps), sum(steps), [o.token_ids for o in outs])
    assert counted["deferred"][2] == counted["now"][2]
    assert counted["deferred"][1] == counted["now"][1]  # the same LLM calls
    assert counted["deferred"][0] < counted["now"][0]  # in fewer, larger LLM steps


def test_parked_rows_hold_their_blocks_until_aborted(pair):
    e = Engine(*pair, max_llm_wait=50, llm_batch_min=50, **KW)
    p = SamplingParams(max_tokens=20, ignore_eos=True, policy="random", llm_fraction=0.5, seed=1)
    keep = e.add_request([5, 6, 7], SamplingParams(max_tokens=40, ignore_eos=True, policy="slm"))
    rid = e.add_request([8, 9, 10, 11], p)
    for _ in range(10):
        e.step()
        seq = e.core.get(rid)
        if seq is not None and seq.parked:
            break
    seq = e.core.get(rid)
    assert seq is not None and seq.parked and seq in e.core.scheduler.llm_queue
    held = e.block_manager.num_blocks - e.block_manager.num_free_blocks
    assert held > 0
    assert e.abort(rid).finish_reason == "abort"
    assert seq not in e.core.scheduler.llm_queue and not seq.parked
    assert e.block_manager.num_blocks - e.block_manager.num_free_blocks < held
    e.abort(keep)
    assert_all_free(e)


def test_no_deadlock_when_every_row_waits(pair, plain):
    """LLM-only requests with a huge wait and batch minimum: nothing else can advance, so the
    LLM runs every step anyway."""
    e = Engine(*pair, max_llm_wait=10_000, llm_batch_min=10_000, **KW)
    prompts = random_prompts(3, 3, 8, seed=6)
    params = SamplingParams(max_tokens=10, ignore_eos=True, policy="llm")
    assert [o.token_ids for o in e.generate(prompts, params)] == \
        [o.token_ids for o in plain.generate(prompts, params)]
    sp = SamplingParams(max_tokens=10, ignore_eos=True, policy="speculative", num_draft_tokens=2)
    assert [o.token_ids for o in e.generate(prompts, sp)] == [o.token_ids for o in plain.generate(prompts, sp)]


def test_a_request_may_ask_not_to_wait(pair):
    e = Engine(*pair, max_llm_wait=50, llm_batch_min=50, **KW)
    rid = e.add_request([5, 6, 7], SamplingParams(max_tokens=8, ignore_eos=True, policy="llm", max_llm_wait=0))
    e.add_request([8, 9], SamplingParams(max_tokens=30, ignore_eos=True, policy="slm"))
    events = [ev for _ in range(3) for ev in e.step() if ev.request_id == rid]
    assert len(events) == 3  # one LLM token per step: it never waits


def test_deferred_check_and_correct_keeps_drafting(pair, hf_models):
    """verify=True with a wait: a routed row keeps the SLM's token tentatively and goes on;
    the LLM checks the run later. Every token up to the last the LLM made or checked is the
    LLM's own greedy output; nothing is computed twice; blocks come back."""
    llm_hf = hf_models["llama"][1]
    e = Engine(*pair, max_llm_wait=3, **KW)
    prompts = random_prompts(6, 3, 10, seed=8)
    outs = e.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True, policy="random", llm_fraction=0.3,
                                              verify=True, seed=2))
    checked = 0
    for p, o in zip(prompts, outs):
        ref = hf_greedy(llm_hf, p, 16)
        last = max((i for i, f in enumerate(o.from_llm) if f), default=-1)
        assert o.token_ids[:last + 1] == ref[:last + 1]
        checked += last + 1
        n = len(p) + len(o.token_ids)
        assert o.stats["llm_forward_tokens"] <= n + o.stats["llm_discarded_tokens"]
        assert o.stats["slm_forward_tokens"] <= n + o.stats["slm_discarded_tokens"]
    assert checked > 20 and sum(o.stats["llm_calls"] for o in outs) > 0
    assert_all_free(e)


def test_idle_prefill_reads_prompts_once(pair, plain):
    """llm_prefill="idle": the LLM reads prompts in steps without an LLM call; the first routed
    token's catch-up is then short, and no position is computed twice."""
    prompts, params = _requests(n=6, seed=3)
    e = Engine(*pair, llm_prefill="idle", **KW)
    ref, got = plain.generate(prompts, params), e.generate(prompts, params)
    for r, g in zip(ref, got):
        assert g.token_ids == r.token_ids
        n = len(g.prompt_token_ids) + len(g.token_ids)
        assert g.stats["llm_forward_tokens"] <= n + g.stats["llm_discarded_tokens"]
        assert g.stats["llm_forward_tokens"] >= r.stats["llm_forward_tokens"]  # the prompt, read early
    assert_all_free(e)


@pytest.mark.parametrize("params", [dict(policy="speculative", num_draft_tokens=3),
                                    dict(policy="router", threshold=0.5, verify=True), dict(policy="llm")],
                         ids=["speculative", "verify", "llm"])
@pytest.mark.parametrize("deferral", [{}, dict(max_llm_wait=3, llm_batch_min=4)], ids=["now", "deferred"])
def test_idle_prefill_leaves_the_catch_up_its_head_position(pair, plain, params, deferral):
    """A request alone: its prompt is read in the steps before its first LLM call (drafting,
    or parked), and the catch-up still computes the last prompt position, where the head
    makes the LLM's first token or checks the first tentative one. (Reading the whole prompt
    there once handed the head a neighbour's row: wrong tokens, or an IndexError.)"""
    prompt = random_prompts(1, 6, 6, seed=11)[0]
    sp = SamplingParams(max_tokens=10, ignore_eos=True, **params)
    lazy = Engine(*pair, **KW, **deferral) if deferral else plain
    e = Engine(*pair, llm_prefill="idle", **KW, **deferral)
    ref, got = lazy.generate([prompt], sp)[0], e.generate([prompt], sp)[0]
    assert (got.token_ids, got.from_llm) == (ref.token_ids, ref.from_llm)
    assert got.stats["llm_forward_tokens"] == ref.stats["llm_forward_tokens"]  # the same positions, read earlier
    if sp.policy != "router":  # these make the LLM's greedy tokens
        assert got.token_ids == plain.generate([prompt], SamplingParams(max_tokens=10, ignore_eos=True,
                                                                         policy="llm"))[0].token_ids
    assert_all_free(e)
