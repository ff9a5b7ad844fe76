"""Verification in the catch-up: policy "speculative" (lossless) and check-and-correct
(verify=True), on the shared page table with rollback.

The LLM is the tests' Llama; the SLMs are the tests' Qwen2 (rarely agrees with it), the
Llama itself (always agrees) and the Llama with perturbed weights (agrees on most
tokens), so drafts are rejected at every depth, also across block boundaries (pages of
3 and 4 tokens)."""
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from citer import Engine, SamplingParams
from conftest import assert_all_free, hf_greedy, random_prompts

BASE = dict(ignore_eos=True)


@pytest.fixture(scope="module")
def near_llm(hf_models, tmp_path_factory):
    """The LLM's folder with every weight perturbed: an SLM that agrees on most tokens."""
    src = hf_models["llama"][0]
    dst = str(tmp_path_factory.mktemp("near_llm"))
    shutil.copytree(src, dst, dirs_exist_ok=True)
    fn = os.path.join(dst, "model.safetensors")
    g = torch.Generator().manual_seed(0)
    weights = {k: (v + 0.06 * v.std() * torch.randn(v.shape, generator=g)).contiguous()
               for k, v in load_file(fn).items()}
    save_file(weights, fn, metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def slms(hf_models, near_llm):
    return {"qwen2": hf_models["qwen2"][0], "same": hf_models["llama"][0], "near": near_llm}


def engine(slm, hf_models, block_size=4, **kw):
    return Engine(slm, hf_models["llama"][0], block_size=block_size, num_blocks=kw.pop("num_blocks", 160),
                  max_model_len=96, **kw)


def count_llm_calls(e):
    """Wrap the LLM runner: -> {request id: the catch-up forwards it took part in}."""
    calls, run = {}, e.core.llm.run

    def counted(seqs, spec, head_rows=None):
        for s in seqs:
            calls[s.request_id] = calls.get(s.request_id, 0) + 1
        return run(seqs, spec, head_rows)

    e.core.llm.run = counted
    return calls


@pytest.mark.parametrize("slm", ["near", "qwen2", "same"])
@pytest.mark.parametrize("block_size", [3, 4])
def test_greedy_speculative_is_the_llm(hf_models, slms, slm, block_size):
    e = engine(slms[slm], hf_models, block_size)
    prompts = random_prompts(4, 2, 14, seed=block_size)  # ragged, several pages each
    ref = e.generate(prompts, SamplingParams(max_tokens=18, policy="llm", **BASE))
    for p, r in zip(prompts, ref):
        assert r.token_ids == hf_greedy(hf_models["llama"][1], p, 18)
    calls = count_llm_calls(e)
    for kw in (dict(num_draft_tokens=1), dict(num_draft_tokens=2), dict(), dict(num_draft_tokens=7),
               dict(num_draft_tokens=8, draft_confidence=0.6)):
        calls.clear()
        outs = e.generate(prompts, SamplingParams(max_tokens=18, policy="speculative", **kw, **BASE))
        assert [o.token_ids for o in outs] == [r.token_ids for r in ref], kw
        k = kw.get("num_draft_tokens", 4)
        for o in outs:
            s = o.stats
            assert calls[o.request_id] == s["llm_calls"]  # every LLM call is one catch-up forward
            assert s["accepted"] <= s["drafted"] and o.stats["acceptance_rate"] == s["accepted"] / max(s["drafted"], 1)
            assert s["llm_forward_tokens"] - s["llm_discarded_tokens"] <= len(o.prompt_token_ids) + 18
            assert s["slm_forward_tokens"] - s["slm_discarded_tokens"] <= len(o.prompt_token_ids) + 18
            if slm == "same" and "draft_confidence" not in kw:  # every draft stands: k + 1 tokens per call
                assert s["acceptance_rate"] == 1.0 and s["llm_calls"] == -(-18 // (k + 1))
                assert s["slm_discarded_tokens"] == s["llm_discarded_tokens"] == 0
    if slm == "near":
        assert 0.2 < sum(o.stats["acceptance_rate"] for o in outs) / len(outs) < 1.0  # partial rollbacks happened
    assert_all_free(e)


def test_forward_and_discarded_tokens_add_up(hf_models, slms, monkeypatch):
    """Per request and model: positions computed = positions kept at the end + positions
    computed and then rolled back (each model computes a position again only after a
    rollback changed its token)."""
    e = engine(slms["near"], hf_models)
    kept, finish = {}, e.core.scheduler.finish

    def record(seq, reason):
        kept[seq.request_id] = dict(seq.num_computed)
        finish(seq, reason)

    monkeypatch.setattr(e.core.scheduler, "finish", record)
    prompts = random_prompts(3, 3, 12, seed=8)
    for params in (SamplingParams(max_tokens=20, policy="speculative", **BASE),
                   SamplingParams(max_tokens=20, policy="confidence", confidence_threshold=0.9, verify=True, **BASE),
                   SamplingParams(max_tokens=20, policy="speculative", temperature=0.9, seed=2, **BASE)):
        for o in e.generate(prompts, params):
            for m in ("slm", "llm"):
                s = o.stats
                assert s[f"{m}_forward_tokens"] == kept[o.request_id][m] + s[f"{m}_discarded_tokens"]
                assert kept[o.request_id][m] <= len(o.prompt_token_ids) + len(o.token_ids)
    assert any(o.stats["slm_discarded_tokens"] for o in e.generate(prompts, SamplingParams(
        max_tokens=20, policy="speculative", **BASE)))


def test_sampled_speculative_follows_the_llm_distribution(hf_models, slms):
    """The first two tokens of 500 seeded speculative samples vs the LLM's own
    distribution (temperature 0.8): each frequency within binomial noise."""
    llm = hf_models["llama"][1]
    e = engine(slms["qwen2"], hf_models)  # a poor drafter: many rejections, residual draws
    prompt, t, n = [5, 6, 7], 0.8, 500
    outs = e.generate([prompt] * n, [SamplingParams(max_tokens=2, temperature=t, seed=s, policy="speculative",
                                                    num_draft_tokens=3, **BASE) for s in range(n)])
    with torch.no_grad():
        p1 = torch.softmax(llm(torch.tensor([prompt])).logits[0, -1].double() / t, -1)
    first = torch.bincount(torch.tensor([o.token_ids[0] for o in outs]), minlength=p1.numel()).double() / n
    assert torch.all((first - p1).abs() <= 4 * (p1 * (1 - p1) / n).sqrt() + 0.01)
    top = int(first.argmax())  # the second token, given the most common first one
    seconds = [o.token_ids[1] for o in outs if o.token_ids[0] == top]
    with torch.no_grad():
        p2 = torch.softmax(llm(torch.tensor([prompt + [top]])).logits[0, -1].double() / t, -1)
    m = len(seconds)
    freq = torch.bincount(torch.tensor(seconds), minlength=p2.numel()).double() / m
    assert m > 50 and torch.all((freq - p2).abs() <= 4 * (p2 * (1 - p2) / m).sqrt() + 0.02)
    assert sum(o.stats["drafted"] - o.stats["accepted"] for o in outs) > n // 2  # rejections were exercised


def test_sampled_speculative_is_seeded_alone_or_batched(hf_models, slms):
    e = engine(slms["near"], hf_models)
    prompts = random_prompts(3, 3, 10, seed=9)
    p = SamplingParams(max_tokens=16, temperature=0.9, top_k=20, seed=11, policy="speculative", **BASE)
    batched = e.generate(prompts, p)
    alone = [e.generate([q], p)[0] for q in prompts]
    assert [o.token_ids for o in batched] == [o.token_ids for o in alone]
    assert e.generate(prompts[:1], SamplingParams(max_tokens=16, temperature=0.9, top_k=20, seed=12,
                                                  policy="speculative", **BASE))[0].token_ids != alone[0].token_ids


@pytest.mark.parametrize("policy", [dict(policy="confidence", confidence_threshold=0.2),
                                    dict(policy="random", llm_fraction=0.25, seed=4)])
def test_check_and_correct_keeps_only_tokens_the_llm_would_make(hf_models, slms, policy):
    """verify=True: every SLM token kept equals the LLM's greedy choice on its prefix (an SLM
    token that would end the request is checked by the LLM at once, so none is final unchecked);
    LLM tokens equal it by construction."""
    llm = hf_models["llama"][1]
    e = engine(slms["qwen2"], hf_models)  # disagrees often: many corrections
    prompts = random_prompts(3, 3, 12, seed=10)
    outs = e.generate(prompts, SamplingParams(max_tokens=24, verify=True, **policy, **BASE))
    corrected = 0
    for p, o in zip(prompts, outs):
        with torch.no_grad():
            greedy = llm(torch.tensor([p + o.token_ids])).logits[0].argmax(-1)
        assert o.from_llm[-1]  # the request's last token was the LLM's check
        for t in range(len(o.token_ids)):
            assert o.token_ids[t] == int(greedy[len(p) + t - 1]), (t, o.from_llm[t])
        corrected += o.stats.get("corrected", 0)
    assert corrected > 0  # rollbacks happened
    assert_all_free(e)


@pytest.mark.parametrize("deferral", [{}, dict(max_llm_wait=3, llm_batch_min=4)], ids=["now", "deferred"])
def test_check_and_correct_checks_a_sampled_stop_token(hf_models, slms, deferral):
    """verify=True with sampling: a stop token the SLM samples stays tentative and the LLM
    checks it at once, accepting it at the ratio of the two models' probabilities (some
    requests end on the SLM's stop token). The LLM once made that position afresh whenever the
    SLM sampled a stop token: it ran depending on the sampled token, and stop tokens came out
    too rarely (a helper measured P(stop) 0.209-0.238 against the LLM's 0.261, z up to -20)."""
    e = engine(slms["near"], hf_models, **deferral)
    prompt = random_prompts(1, 5, 5, seed=12)[0]
    first = e.generate([prompt] * 16, SamplingParams(max_tokens=12, policy="slm", temperature=1.0, seed=5, **BASE))
    stop = max({t for o in first for t in o.token_ids}, key=lambda t: sum(o.token_ids.count(t) for o in first))
    params = [SamplingParams(max_tokens=12, policy="random", llm_fraction=0.5, verify=True, temperature=1.0,
                             seed=100 + i, stop_token_ids=[stop], **BASE) for i in range(64)]
    outs = e.generate([prompt] * len(params), params)
    ended = [o for o in outs if o.finish_reason == "stop"]
    assert all(o.token_ids[-1] == stop and stop not in o.token_ids[:-1] for o in ended)
    assert any(not o.from_llm[-1] for o in ended)  # the SLM's stop token, checked and accepted
    assert_all_free(e)


def test_streams_never_take_a_token_back(hf_models, slms):
    """Joined stream events equal generate's output under every policy that rolls back:
    tokens are streamed once they can no longer change."""
    e = engine(slms["near"], hf_models)
    prompt = random_prompts(1, 5, 5, seed=12)[0]
    for params in (SamplingParams(max_tokens=20, policy="speculative", **BASE),
                   SamplingParams(max_tokens=20, policy="speculative", temperature=0.8, seed=3, **BASE),
                   SamplingParams(max_tokens=20, policy="confidence", confidence_threshold=0.7, verify=True, **BASE),
                   SamplingParams(max_tokens=20, policy="random", llm_fraction=0.2, seed=1, verify=True,
                                  temperature=0.7, **BASE)):
        ref = e.generate([prompt], params)[0]
        events = list(e.stream(prompt, params))
        assert [ev.token_id for ev in events] == ref.token_ids
        assert [ev.from_llm for ev in events] == ref.from_llm
        assert events[-1].finish_reason == "length"
    assert_all_free(e)


def test_blocks_come_back_after_rollbacks_aborts_and_errors(hf_models, slms, monkeypatch):
    e = engine(slms["near"], hf_models, block_size=3, num_blocks=40)
    p = SamplingParams(max_tokens=30, policy="speculative", **BASE)
    rid = e.add_request(random_prompts(1, 7, 7, seed=1)[0], p)
    rolled = False
    for _ in range(40):  # abort right after a step that rolled back
        e.step()
        seq = e.core.get(rid)
        if seq is not None and seq.stats.slm_discarded_tokens:
            rolled = True
            break
    assert rolled
    e.abort(rid)
    assert_all_free(e)
    monkeypatch.setattr(e.core.llm, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("llm lost")))
    with pytest.raises(RuntimeError, match="llm lost"):
        e.generate(random_prompts(2, 4, 9, seed=2), p)
    monkeypatch.undo()
    assert_all_free(e)
    s = e.stream([5, 6, 7], p)
    for _ in range(6):
        next(s)
    s.close()
    assert_all_free(e)


def test_stop_tokens_and_lengths_inside_accepted_drafts(hf_models, slms):
    """A stop id or the length limit met inside a run of accepted drafts ends the request
    at that token exactly, as the LLM alone would."""
    e = engine(slms["same"], hf_models)
    prompt = random_prompts(1, 4, 4, seed=13)[0]
    full = e.generate([prompt], SamplingParams(max_tokens=20, policy="llm", **BASE))[0].token_ids
    stop = full[6]
    for k in (4, 7):
        o = e.generate([prompt], SamplingParams(max_tokens=20, policy="speculative", num_draft_tokens=k,
                                                stop_token_ids=[stop], **BASE))[0]
        assert o.token_ids == full[:full.index(stop) + 1] and o.finish_reason == "stop"
        o = e.generate([prompt], SamplingParams(max_tokens=9, policy="speculative", num_draft_tokens=k, **BASE))[0]
        assert o.token_ids == full[:9] and o.finish_reason == "length"
    assert_all_free(e)


def test_verify_is_for_the_routed_policies():
    with pytest.raises(ValueError, match="verify=True applies to the policies"):
        SamplingParams(policy="slm", verify=True)
    with pytest.raises(ValueError, match="num_draft_tokens must be an int >= 1"):
        SamplingParams(policy="speculative", num_draft_tokens=0)
    with pytest.raises(ValueError, match="draft_confidence must be in"):
        SamplingParams(policy="speculative", draft_confidence=1.5)
