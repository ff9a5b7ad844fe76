"""Weight-only int8 (EngineArgs quantization="int8"): equal to its own dequantized reference
(the same model with each projection's weights replaced by q * scale in float32), and
within a stated bound of the float model."""
import pytest
import torch

from citer import Engine, SamplingParams
from citer.engine.models.quantize import PROJECTIONS
from citer.kernels.linear import quantize_int8
from conftest import random_prompts

KW = dict(block_size=8, num_blocks=64, max_model_len=64)


def _logprob_rows(outs):
    return torch.tensor([[lp for _, lp in x.top] for o in outs for x in o.logprobs])


def _dequantized_engine(path):
    """The float engine with every projection's and the lm_head's weight (a tied embedding
    with it) set to its int8 round trip."""
    e = Engine(llm=path, **KW)
    model = e.core.llm.model
    with torch.no_grad():
        for mod in [layer.get_submodule(p) for layer in model.layers for p in PROJECTIONS] + [model.lm_head]:
            q, s = quantize_int8(mod.weight)
            mod.weight.copy_(q.float() * s[:, None])
    return e


@pytest.mark.parametrize("name", ["qwen2", "llama"])
def test_int8_equals_its_dequantized_reference_and_stays_near_float(hf_models, name):
    path = hf_models[name][0]
    prompts = random_prompts(4, 3, 12, seed=9)
    params = SamplingParams(max_tokens=12, ignore_eos=True, policy="llm", logprobs=5)
    q = Engine(llm=path, quantization="int8", **KW)
    assert all(getattr(layer.self_attn.qkv_proj, "qweight").dtype == torch.int8 for layer in q.core.llm.model.layers)
    model = q.core.llm.model
    assert not hasattr(model.layers[0].mlp.down_proj, "weight")  # no float copy kept
    assert model.lm_head.qweight.dtype == torch.int8 and not hasattr(model.lm_head, "weight")
    tied = model.cfg.tie_word_embeddings
    assert hasattr(model.embed_tokens, "qweight") == tied and hasattr(model.embed_tokens, "weight") != tied
    if tied:  # one int8 table for both, its rows dequantized when gathered
        assert model.embed_tokens.qweight is model.lm_head.qweight
        ids = torch.tensor([0, 5, 3, 5])
        assert torch.equal(model.embed(ids), model.lm_head.qweight[ids].float() * model.lm_head.qscale[ids, None])
    got, ref = q.generate(prompts, params), _dequantized_engine(path).generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    assert torch.allclose(_logprob_rows(got), _logprob_rows(ref), atol=1e-4)
    # against the float model: the first token's top-5 logprobs (same prefix) within 0.25 nats on these random
    # models (int8 per-channel error at init_std 0.2; real checkpoints: benchmarks/cpu_vs_llamacpp.py)
    flt = Engine(llm=path, **KW).generate(prompts, params)
    first = lambda outs: torch.tensor([[lp for _, lp in o.logprobs[0].top] for o in outs])  # noqa: E731
    assert (first(got) - first(flt)).abs().max() < 0.25
    assert sum(g.token_ids[0] == f.token_ids[0] for g, f in zip(got, flt)) >= 3  # same prefix, same choice mostly


def test_int8_routes_like_float(hf_models, router_path):
    slm, llm = hf_models["qwen2"][0], hf_models["llama"][0]
    e = Engine(slm, llm, router_path, quantization="int8", **KW)
    outs = e.generate(random_prompts(3, 3, 9, seed=2), SamplingParams(max_tokens=10, ignore_eos=True, policy="router",
                                                                      threshold=0.5))
    assert all(len(o.token_ids) == 10 and all(0 <= s <= 1 for s in o.router_scores) for o in outs)
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        Engine(slm, llm, quantization="int4", **KW)


def test_teacher_forcing_over_an_int8_engine(hf_models):
    """The research pipeline's Forcer over an int8 engine's own models (a tied SLM: its
    embedding is the int8 table) gives the engine's greedy tokens."""
    from citer.research.training.forcing import Forcer

    slm, llm = hf_models["qwen2"][0], hf_models["llama"][0]
    e = Engine(slm, llm, quantization="int8", **KW)
    prompt = random_prompts(1, 6, 7, seed=4)[0]
    out = e.generate([prompt], SamplingParams(max_tokens=6, ignore_eos=True, policy="slm"))[0]
    forced = Forcer.from_engine(e).run([prompt + out.token_ids])[0]
    assert forced.slm_pred[-7:-1].tolist() == out.token_ids  # each position predicts the next token
