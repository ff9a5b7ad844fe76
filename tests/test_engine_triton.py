"""The whole engine through the Triton kernels (CITER_BACKEND=triton; under the
interpreter on CPU): same greedy tokens as transformers for policy slm, llm and a mixed
routing. Kept tiny: the interpreter runs every program in Python."""
import pytest

from citer import Engine, SamplingParams
from conftest import DEVICE, hf_greedy, random_prompts


@pytest.fixture(scope="module")
def engine(hf_models):
    return Engine(hf_models["qwen2"][0], hf_models["llama"][0], device=DEVICE, block_size=16, num_blocks=16,
                  max_model_len=64, backend="triton")


def test_backend_is_triton(engine):
    assert engine.backend == "triton" and engine.core.slm.ops.name == "triton"


@pytest.mark.parametrize("policy,model", [("slm", "qwen2"), ("llm", "llama")])
def test_triton_engine_matches_transformers(engine, hf_models, policy, model):
    prompts = random_prompts(2, 5, 20, seed=21)  # ragged; the longer spans two blocks
    outs = engine.generate(prompts, SamplingParams(max_tokens=5, policy=policy, ignore_eos=True))
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(hf_models[model][1], p, 5)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_triton_engine_mixed_routing_equals_torch_backend(engine, hf_models):
    prompts = random_prompts(2, 5, 20, seed=22)
    params = SamplingParams(max_tokens=6, policy="random", llm_fraction=0.5, seed=3, ignore_eos=True)
    ref = Engine(hf_models["qwen2"][0], hf_models["llama"][0], block_size=16, num_blocks=16, max_model_len=64,
                 backend="torch").generate(prompts, params)
    outs = engine.generate(prompts, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
    assert [o.from_llm for o in outs] == [o.from_llm for o in ref]
    assert any(any(o.from_llm) for o in outs) and not all(all(o.from_llm) for o in outs)


def test_triton_path_names_its_devices(engine):
    """No tensor of the Triton path lands on the default device (see test_engine's check):
    what would put a CPU tensor beside CUDA ones on a GPU fails here under "meta"."""
    import torch

    prompts = random_prompts(2, 2, 12, seed=23)
    params = SamplingParams(max_tokens=3, policy="random", llm_fraction=0.5, temperature=0.7, seed=3, ignore_eos=True)
    ref = engine.generate(prompts, params)
    with torch.device("meta"):
        outs = engine.generate(prompts, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]


def test_triton_engine_speculative_is_the_llm(engine, hf_models):
    """Greedy speculative decoding through the kernels: the LLM's head on every catch-up
    position (the routed head over all rows), rollbacks on the page table."""
    prompts = random_prompts(2, 4, 12, seed=24)
    ref = engine.generate(prompts, SamplingParams(max_tokens=5, policy="llm", ignore_eos=True))
    outs = engine.generate(prompts, SamplingParams(max_tokens=5, policy="speculative", num_draft_tokens=2,
                                                   ignore_eos=True))
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
    assert all(o.stats["drafted"] > 0 for o in outs)
    assert [o.router_scores for o in outs] == [[None] * 5] * 2  # no router ran: None, not NaN


def test_triton_engine_int8_equals_torch_backend_int8(hf_models):
    """quantization="int8" through the Triton ops: the layer projections on the weight-only
    int8 kernel (kernels/linear_triton.py), the lm_head in the routed head; the same greedy
    tokens as the torch backend's int8 engine, in float32."""
    prompts = random_prompts(2, 5, 14, seed=25)
    params = SamplingParams(max_tokens=4, policy="random", llm_fraction=0.5, seed=4, ignore_eos=True)
    outs = {}
    for backend in ("triton", "torch"):
        e = Engine(hf_models["qwen2"][0], hf_models["llama"][0], device=DEVICE, block_size=16, num_blocks=16,
                   max_model_len=64, backend=backend, quantization="int8")
        outs[backend] = [(o.token_ids, o.from_llm) for o in e.generate(prompts, params)]
    assert outs["triton"] == outs["torch"]
