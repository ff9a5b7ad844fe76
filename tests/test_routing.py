"""Routed decoding: policies, the lazy LLM catch-up, streaming, calibration, no leaks."""
import pytest
import torch

from citer import Engine, SamplingParams
from citer.engine.models.router import load_router
from conftest import assert_all_free, random_prompts

BS = 8


@pytest.fixture(scope="module")
def engine(hf_models, router_path):
    return Engine(hf_models["qwen2"][0], hf_models["llama"][0], router_path,
                  block_size=BS, num_blocks=128, max_model_len=256)




def test_folded_router_equals_training_network(router_path):
    net, _ = __import__("citer.research.router_nets", fromlist=["load_router_mlp"]).load_router_mlp(router_path)
    folded = load_router(router_path, 64)
    h = torch.randn(7, 64)
    with torch.no_grad():
        ref = torch.sigmoid(net(h))
    assert torch.allclose(folded.score(h), ref, atol=1e-5)


def test_router_hidden_size_mismatch(router_path, hf_models):
    with pytest.raises(ValueError, match="hidden size 64.*SLM's hidden size is 96"):
        Engine(hf_models["llama"][0], hf_models["qwen2"][0], router_path, block_size=BS, num_blocks=8)


def test_threshold_extremes_equal_single_model_policies(engine):
    prompts = random_prompts(3, 4, 30, seed=11)
    base = dict(max_tokens=12, ignore_eos=True)
    slm = engine.generate(prompts, SamplingParams(policy="slm", **base))
    llm = engine.generate(prompts, SamplingParams(policy="llm", **base))
    r0 = engine.generate(prompts, SamplingParams(policy="router", threshold=0.0, **base))
    r1 = engine.generate(prompts, SamplingParams(policy="router", threshold=1.01, **base))
    assert [o.token_ids for o in r0] == [o.token_ids for o in slm]
    assert [o.token_ids for o in r1] == [o.token_ids for o in llm]
    assert all(not any(o.from_llm) for o in r0) and all(all(o.from_llm) for o in r1)
    assert all(s is not None for o in r0 for s in o.router_scores)
    assert_all_free(engine)


def _check_each_token_from_its_model(hf_models, prompt, out):
    """Every token marked from_llm is the LLM's greedy choice on that exact prefix; else the SLM's."""
    seq = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        slm_next = hf_models["qwen2"][1](seq).logits[0].argmax(-1)
        llm_next = hf_models["llama"][1](seq).logits[0].argmax(-1)
    n = len(prompt)
    for t, (tok, from_llm) in enumerate(zip(out.token_ids, out.from_llm)):
        expect = llm_next[n + t - 1] if from_llm else slm_next[n + t - 1]
        assert tok == int(expect), f"token {t} (from_llm={from_llm})"


@pytest.mark.parametrize("params", [
    dict(policy="random", llm_fraction=0.3, seed=7),
    dict(policy="router", threshold=0.5),
    dict(policy="confidence", confidence_threshold=0.3),
])
def test_mixed_routing_tokens_come_from_the_right_model(engine, hf_models, params):
    prompts = random_prompts(4, 3, 28, seed=12)
    outs = engine.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True, **params))
    shares = [o.llm_share for o in outs]
    assert 0 < sum(shares) / len(shares) < 1, "routing should mix both models"
    for p, o in zip(prompts, outs):
        _check_each_token_from_its_model(hf_models, p, o)
        n = len(p) + len(o.token_ids)
        assert o.stats["slm_forward_tokens"] <= n and o.stats["llm_forward_tokens"] <= n
        assert o.stats["llm_calls"] == sum(o.from_llm)
    assert_all_free(engine)


def test_confidence_policy_uses_slm_top_probability(engine, hf_models):
    prompt = random_prompts(1, 12, 12, seed=13)[0]
    o = engine.generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True, policy="confidence",
                                                 confidence_threshold=0.3))[0]
    seq = torch.tensor([prompt + o.token_ids])
    with torch.no_grad():
        top = torch.softmax(hf_models["qwen2"][1](seq).logits[0].float(), -1).amax(-1)
    n = len(prompt)
    assert o.from_llm == [bool(top[n + t - 1] < 0.3) for t in range(12)]


def test_random_policy_share_and_seed(engine):
    prompts = random_prompts(6, 3, 10, seed=14)
    p = SamplingParams(max_tokens=40, ignore_eos=True, policy="random", llm_fraction=0.3, seed=3)
    a = engine.generate(prompts, p)
    b = engine.generate(prompts, p)
    assert [o.from_llm for o in a] == [o.from_llm for o in b]
    share = sum(sum(o.from_llm) for o in a) / sum(len(o.from_llm) for o in a)
    assert 0.2 < share < 0.4


def test_sampling_under_routing_is_seeded(engine):
    prompts = random_prompts(2, 5, 12, seed=15)
    p = SamplingParams(max_tokens=12, temperature=0.8, top_k=20, seed=11, policy="router", threshold=0.5,
                       ignore_eos=True)
    a = engine.generate(prompts, p)
    b = engine.generate(prompts[::-1], p)[::-1]
    assert [o.token_ids for o in a] == [o.token_ids for o in b]


def test_stream_equals_generate(engine):
    prompt = "routing 1+2=3"
    p = SamplingParams(max_tokens=20, policy="router", threshold=0.5, ignore_eos=True, stop=["zz"])
    ref = engine.generate(prompt, p)[0]
    events = list(engine.stream(prompt, p))
    assert [e.token_id for e in events] == ref.token_ids
    assert "".join(e.text for e in events) == ref.text
    assert [e.from_llm for e in events] == ref.from_llm
    assert [e.router_score for e in events] == ref.router_scores
    assert events[-1].finish_reason == ref.finish_reason
    assert_all_free(engine)


def test_stream_stopped_early_frees_blocks(engine):
    it = engine.stream([5, 6, 7, 8], SamplingParams(max_tokens=50, policy="router", threshold=0.5, ignore_eos=True))
    for _ in range(3):
        next(it)
    it.close()
    assert_all_free(engine)


def test_abort_mid_routed_generation(engine):
    rid = engine.add_request(list(range(3, 40)), SamplingParams(max_tokens=40, policy="random", llm_fraction=0.5,
                                                                ignore_eos=True))
    for _ in range(5):
        engine.step()
    out = engine.abort(rid)
    assert out.finish_reason == "abort" and len(out.token_ids) == 5
    assert_all_free(engine)


def test_calibrate_threshold_reaches_target(engine):
    prompts = random_prompts(4, 4, 12, seed=16)
    cal = engine.calibrate_threshold(prompts, 0.3, SamplingParams(max_tokens=16, ignore_eos=True), iters=8)
    assert abs(cal.llm_share - 0.3) < 0.12
    outs = engine.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True, policy="router",
                                                   threshold=cal.threshold))
    share = sum(sum(o.from_llm) for o in outs) / sum(len(o.from_llm) for o in outs)
    assert share == pytest.approx(cal.llm_share)


def test_profile_reports_phase_times(hf_models, router_path):
    eng = Engine(hf_models["qwen2"][0], hf_models["llama"][0], router_path, block_size=BS, num_blocks=32,
                 max_model_len=128, profile=True)
    o = eng.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=10, policy="router", threshold=0.5,
                                                     ignore_eos=True))[0]
    for k in ("slm_time", "router_time", "other_time"):
        assert o.stats[k] > 0
    if any(o.from_llm):
        assert o.stats["llm_time"] > 0
