"""Routers over the SLM's hidden state plus the head's signals (features "hidden+head"):
folding, the residual start (the confidence rule), the saved format, and routed decoding
with them under both backends (tokens from the right model, scores equal to transformers'
logits put through the training network, no position computed twice, nothing leaked)."""
import json
import os

import pytest
import torch

from citer import Engine, SamplingParams
from citer.kernels.routed_head import head_signals_ref
from citer.engine.models.router import load_router
from citer.research.router_nets import RouterMLP, load_router_mlp, save_router
from conftest import DEVICE, assert_all_free, random_prompts


def _perturbed(features, seed=0):
    torch.manual_seed(seed)
    net = RouterMLP(32, features=features)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(5):  # a few steps: BatchNorm statistics and every layer move
        h, s = torch.randn(64, 32), torch.randn(64, 3) * 3
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(h, s if net.head_signals else None),
                                                                    torch.rand(64).round())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@pytest.mark.parametrize("features", ["hidden", "hidden+head"])
def test_folded_router_equals_training_network(tmp_path, features):
    net = _perturbed(features)
    save_router(net, str(tmp_path))
    folded = load_router(str(tmp_path), 32)
    assert folded.features == features and folded.head_signals == (features == "hidden+head")
    h, s = torch.randn(9, 32), torch.randn(9, 3) * 3
    signals = s if net.head_signals else None
    with torch.no_grad():
        ref = torch.sigmoid(net(h, signals))
    assert torch.allclose(folded.score(h, signals), ref, atol=1e-5)
    assert torch.allclose(folded.to("cpu").score(h, signals), ref, atol=1e-5)


def test_untrained_residual_router_is_the_confidence_rule():
    """At initialisation p = sigmoid(logit(top probability)) = the top probability: it
    ranks (and thresholds) exactly like policy confidence."""
    net = RouterMLP(32, features="hidden+head")
    net.net[1].running_mean.uniform_(-1, 1)  # whatever the MLP's statistics, its output is 0 at start
    folded = load_router_folded(net)
    logits = torch.randn(200, 50) * torch.linspace(0.1, 4, 200)[:, None]
    top_prob = torch.softmax(logits, -1).amax(-1)
    score = folded.score(torch.randn(200, 32), head_signals_ref(logits))
    assert torch.allclose(score, top_prob, atol=1e-5)
    assert torch.equal(score.argsort(), top_prob.argsort())


def load_router_folded(net):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        save_router(net.eval(), d)
        return load_router(d, net.hidden_size)


def test_router_folder_features(tmp_path):
    save_router(RouterMLP(16, features="hidden+head").eval(), str(tmp_path / "a"))
    cfg = json.load(open(tmp_path / "a" / "router_config.json"))
    assert cfg["features"] == "hidden+head"
    # a folder from before the field existed is a hidden-only router
    save_router(RouterMLP(16).eval(), str(tmp_path / "b"))
    cfg_b = tmp_path / "b" / "router_config.json"
    cfg = json.load(open(cfg_b))
    del cfg["features"]
    json.dump(cfg, open(cfg_b, "w"))
    assert load_router(str(tmp_path / "b"), 16).features == "hidden"
    cfg["features"] = "logits"
    json.dump(cfg, open(cfg_b, "w"))
    with pytest.raises(ValueError, match="unsupported router features 'logits'"):
        load_router(str(tmp_path / "b"))
    # weights of one kind under a config of the other: named
    cfg["features"] = "hidden+head"
    json.dump(cfg, open(cfg_b, "w"))
    with pytest.raises(ValueError, match="do not fit its config.*hidden\\+head"):
        load_router_mlp(str(tmp_path / "b"))
    with pytest.raises(ValueError, match="unknown router features"):
        RouterMLP(16, features="head")
    with pytest.raises(ValueError, match="needs the head's signals"):
        RouterMLP(16, features="hidden+head")(torch.randn(2, 16))


def _reference_scores(hf_models, signal_router_path, prompt, out):
    """transformers' SLM on prompt + output -> per generated token the training network's score."""
    net, _ = load_router_mlp(signal_router_path)
    slm = hf_models["qwen2"][1]
    seq = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        o = slm(seq, output_hidden_states=True)
        h, logits = o.hidden_states[-1][0], o.logits[0]  # the last hidden state is after the final norm
        rows = torch.arange(len(prompt) - 1, len(prompt) + len(out.token_ids) - 1)
        return torch.sigmoid(net(h[rows], head_signals_ref(logits[rows]))), \
            slm(seq).logits[0].argmax(-1), hf_models["llama"][1](seq).logits[0].argmax(-1)


def _check_routed(hf_models, signal_router_path, prompts, outs, threshold):
    for p, o in zip(prompts, outs):
        ref, slm_next, llm_next = _reference_scores(hf_models, signal_router_path, p, o)
        got = torch.tensor(o.router_scores)
        assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()
        n = len(p)
        for t, (tok, from_llm) in enumerate(zip(o.token_ids, o.from_llm)):
            assert from_llm == bool(ref[t] < threshold)
            assert tok == int((llm_next if from_llm else slm_next)[n + t - 1]), f"token {t}"
        total = len(p) + len(o.token_ids)
        assert o.stats["slm_forward_tokens"] <= total and o.stats["llm_forward_tokens"] <= total


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_head_signal_router_routes_exactly(hf_models, signal_router_path, backend):
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1" and DEVICE == "cpu":
        pytest.skip("the Triton path on CPU needs TRITON_INTERPRET=1")
    engine = Engine(hf_models["qwen2"][0], hf_models["llama"][0], signal_router_path, device=DEVICE,
                    block_size=16, num_blocks=16, max_model_len=64, backend=backend)
    assert engine.router.head_signals
    prompts = random_prompts(2, 5, 20, seed=31) if backend == "triton" else random_prompts(4, 3, 28, seed=31)
    n = 5 if backend == "triton" else 14
    probe = engine.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True, policy="router", threshold=0.0))
    scores = sorted(s for o in probe for s in o.router_scores)
    tau = scores[len(scores) // 2]  # the median: about half the tokens go to the LLM
    outs = engine.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True, policy="router", threshold=tau))
    assert 0 < sum(sum(o.from_llm) for o in outs) < sum(len(o.token_ids) for o in outs)
    _check_routed(hf_models, signal_router_path, prompts, outs, tau)
    assert_all_free(engine)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-6), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_folded_format_round_trip(tmp_path, dtype, atol):
    """save_folded writes the inference form itself (how shipped routers are stored);
    reading it back scores like the training network, exactly in float32."""
    from citer.engine.models.router import save_folded

    net = _perturbed("hidden+head", seed=3)
    original = load_router_folded(net)
    save_folded(original, str(tmp_path / "f"), dtype)
    folded = load_router(str(tmp_path / "f"), 32)
    assert folded.features == "hidden+head" and folded.default_threshold == original.default_threshold
    h, s = torch.randn(50, 32), torch.randn(50, 3) * 3
    assert (folded.score(h, s) - original.score(h, s)).abs().max() <= atol
    with open(tmp_path / "f" / "router_config.json") as fh:
        assert json.load(fh)["architecture"] == "citer-router-folded"


def test_router_records_its_slm_shape(tmp_path):
    from citer.engine.models.router import save_folded
    import dataclasses

    original = load_router_folded(_perturbed("hidden"))
    shape = {"hidden_size": 32, "num_layers": 2, "vocab_size": 100}
    save_folded(dataclasses.replace(original, meta={"slm": "tiny", "slm_shape": shape}), str(tmp_path))
    assert load_router(str(tmp_path), 32, shape).hidden_size == 32
    with pytest.raises(ValueError, match="num_layers 2 .router. vs 3 .SLM."):
        load_router(str(tmp_path), 32, {**shape, "num_layers": 3})


def test_shipped_routers_load_by_name():
    """Routers shipped for public pairs: found by name, folded, with the SLM shape they need."""
    from citer.assets import router_path, shipped_routers

    routers = shipped_routers()
    assert "qwen2.5-coder-0.5b-1.5b" in routers
    for name, path in routers.items():
        assert router_path(name) == path
        r = load_router(path)
        assert r.meta["slm_shape"]["hidden_size"] == r.hidden_size and 0 < r.default_threshold < 1
        assert sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) < 8e6
        with pytest.raises(ValueError, match="does not fit this SLM"):
            load_router(path, r.hidden_size, {**r.meta["slm_shape"], "vocab_size": 7})
    with pytest.raises(FileNotFoundError, match="neither a folder nor a shipped router"):
        router_path("no-such-router")


def test_engine_routes_the_same_with_a_router_saved_folded(hf_models, signal_router_path, tmp_path):
    """The same tokens and provenance from a router saved folded (float32) as from its training form."""
    from citer.engine.models.router import save_folded

    save_folded(load_router(signal_router_path), str(tmp_path))
    prompts = random_prompts(3, 4, 12, seed=5)
    params = SamplingParams(max_tokens=6, ignore_eos=True, policy="router", threshold=0.0)
    engines = [Engine(hf_models["qwen2"][0], hf_models["llama"][0], r, device=DEVICE, block_size=16,
                      num_blocks=16, max_model_len=64) for r in (signal_router_path, str(tmp_path))]
    scores = sorted(s for o in engines[0].generate(prompts, params) for s in o.router_scores)
    params = SamplingParams(max_tokens=6, ignore_eos=True, policy="router", threshold=scores[len(scores) // 2])
    outs = [[(o.token_ids, o.from_llm, o.router_scores) for o in e.generate(prompts, params)] for e in engines]
    for a, b in zip(*outs):
        assert a[:2] == b[:2] and torch.allclose(torch.tensor(a[2]), torch.tensor(b[2]), atol=1e-6)
    assert 0 < sum(sum(f) for _, f, _ in outs[0])
    for e in engines:
        assert_all_free(e)


def test_engine_names_an_unknown_router(hf_models):
    with pytest.raises(FileNotFoundError, match="shipped: .*qwen2.5-coder"):
        Engine(hf_models["qwen2"][0], hf_models["llama"][0], "qwen2.5-coder", device=DEVICE, num_blocks=8)


def test_a_router_shipped_in_float16_keeps_its_w1_in_float16_on_cpu(tmp_path):
    """A hidden-only router whose weights are all float16 values (saved folded in float16, as
    shipped routers are) keeps W1 in float16 for the CPU ops (half the bytes to stream) and
    scores as its float32 copy does; a float32 router and a head-signal router stay float32."""
    from citer.engine.models.router import save_folded

    save_folded(load_router_folded(_perturbed("hidden", seed=4)), str(tmp_path / "h"), torch.float16)
    shipped = load_router(str(tmp_path / "h"), 32)
    half, full = shipped.to("cpu", exact_half_w1=True), shipped.to("cpu")
    assert half.params.w1.dtype == torch.float16 and full.params.w1.dtype == torch.float32
    for rows in (1, 5, 40):  # the CPU kernel's rows and past them (the reference)
        h = torch.randn(rows, 32)
        assert torch.allclose(half.score(h), full.score(h), rtol=1e-6, atol=1e-7)
    assert load_router_folded(_perturbed("hidden", seed=4)).to("cpu", exact_half_w1=True).params.w1.dtype == \
        torch.float32
    save_folded(load_router_folded(_perturbed("hidden+head", seed=4)), str(tmp_path / "s"), torch.float16)
    assert load_router(str(tmp_path / "s"), 32).to("cpu", exact_half_w1=True).params.w1.dtype == torch.float32
