"""GPU-only: the engine's CUDA graphs captured and replayed for real. A graphed engine
gives the same tokens, routing and KV cache as the same engine with enforce_eager=True,
captures each bucket once and replays it for batches of other lengths. Skipped on
machines without CUDA (tests/test_cuda_graph.py checks the same logic on CPU)."""
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

from citer import Engine, SamplingParams  # noqa: E402
from conftest import assert_all_free, random_prompts  # noqa: E402


def _engine(hf_models, router_path, enforce_eager):
    return Engine(hf_models["qwen2"][0], hf_models["llama"][0], router_path, device="cuda", dtype="float32",
                  block_size=16, num_blocks=64, max_model_len=256, max_num_seqs=8, max_graph_query_len=8,
                  enforce_eager=enforce_eager)


@pytest.fixture(scope="module")
def pair(hf_models, router_path):
    return _engine(hf_models, router_path, True), _engine(hf_models, router_path, False)


def test_enforce_eager_turns_graphs_off(pair):
    eager, graphed = pair
    assert eager.core.slm.graphs is None and eager.core.llm.graphs is None
    assert graphed.core.slm.graphs is not None and graphed.core.llm.graphs is not None


@pytest.mark.parametrize("params", [
    dict(policy="random", llm_fraction=0.4),
    dict(policy="router", threshold=0.5),
    dict(policy="llm"),
    dict(policy="random", llm_fraction=0.3, temperature=0.8),
    dict(policy="slm", temperature=0.9, top_p=0.8, seed=6),
    dict(policy="speculative", num_draft_tokens=3),
    dict(policy="speculative", temperature=0.8, seed=2),
    dict(policy="random", llm_fraction=0.3, verify=True),
], ids=["random", "router", "llm", "sampled", "top_p", "speculative", "spec_sampled", "verify"])
def test_graph_replay_equals_eager(pair, params):
    eager, graphed = pair
    prompts = random_prompts(5, 3, 40, seed=7)  # 5 lanes: bucket 8, three padding lanes
    p = SamplingParams(max_tokens=24, ignore_eos=True, **params)
    ref, outs = eager.generate(prompts, p), graphed.generate(prompts, p)
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]  # fp32, IEEE dots
    assert [o.from_llm for o in outs] == [o.from_llm for o in ref]
    for name in ("slm", "llm"):
        for (ka, va), (kb, vb) in zip(getattr(eager.core, name).kv_cache, getattr(graphed.core, name).kv_cache):
            torch.testing.assert_close(ka[:-1], kb[:-1], rtol=1e-5, atol=1e-5)  # all but the sink block
            torch.testing.assert_close(va[:-1], vb[:-1], rtol=1e-5, atol=1e-5)
    assert_all_free(graphed)
    assert graphed.core.slm.graphs.graphs or params["policy"] == "llm"


def test_each_bucket_is_captured_once(hf_models, router_path):
    e = _engine(hf_models, router_path, False)
    p = SamplingParams(max_tokens=16, ignore_eos=True, policy="random", llm_fraction=0.4)
    e.generate(random_prompts(6, 3, 30, seed=8), p)
    graphs = {name: dict(getattr(e.core, name).graphs.graphs) for name in ("slm", "llm")}
    assert graphs["slm"] and any(k[1] > 1 for k in graphs["llm"])
    # other prompts and lengths in the same buckets: the same graph objects replay
    e.generate(random_prompts(6, 3, 30, seed=9), p)
    for name, before in graphs.items():
        after = getattr(e.core, name).graphs.graphs
        for key, g in before.items():
            assert after[key] is g


def test_long_catch_ups_and_a_new_router_in_graphs(hf_models, router_path):
    """Catch-up buckets up to 32 tokens (the prefill kernel inside a graph, queries longer
    than a 16-token page, tail lanes wrapping around the sink block); a router swapped
    under captured graphs; everything captured up front."""
    kw = dict(device="cuda", dtype="float32", block_size=16, num_blocks=96, max_model_len=256, max_num_seqs=4,
              max_graph_query_len=32)
    eager = Engine(hf_models["qwen2"][0], hf_models["llama"][0], router_path, enforce_eager=True, **kw)
    graphed = Engine(hf_models["qwen2"][0], hf_models["llama"][0], router_path, **kw)
    assert graphed.capture_cuda_graphs() == 3 * 6 + 3 + 3
    prompts = random_prompts(3, 3, 12, seed=10)
    for p in (SamplingParams(max_tokens=60, ignore_eos=True, policy="random", llm_fraction=0.05),
              SamplingParams(max_tokens=30, ignore_eos=True, policy="router", threshold=0.5)):
        ref, outs = eager.generate(prompts, p), graphed.generate(prompts, p)
        assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
        assert [o.from_llm for o in outs] == [o.from_llm for o in ref]
    graphed.set_router(router_path)
    p = SamplingParams(max_tokens=30, ignore_eos=True, policy="router", threshold=0.5)
    assert [o.token_ids for o in graphed.generate(prompts, p)] == [o.token_ids for o in eager.generate(prompts, p)]
    assert_all_free(graphed)


def test_bf16_graphs_track_eager(hf_models, router_path):
    """bf16: padded batches may take other GEMM kernels, so tokens may drift apart after a
    near-tie; most must still agree (garbage from a wrong buffer would not)."""
    kw = dict(device="cuda", dtype="bfloat16", block_size=16, num_blocks=96, max_model_len=256, max_num_seqs=8)
    prompts = random_prompts(5, 3, 40, seed=11)
    p = SamplingParams(max_tokens=24, ignore_eos=True, policy="random", llm_fraction=0.2)
    ref = Engine(hf_models["qwen2"][0], hf_models["llama"][0], enforce_eager=True, **kw).generate(prompts, p)
    graphed = Engine(hf_models["qwen2"][0], hf_models["llama"][0], **kw)
    outs = graphed.generate(prompts, p)
    first = [o.token_ids[:4] == r.token_ids[:4] for o, r in zip(outs, ref)]
    assert sum(first) >= 4, first
    assert graphed.core.slm.graphs.graphs and graphed.core.llm.graphs.graphs
    assert_all_free(graphed)


def test_speculative_under_graphs_is_the_llm(pair):
    """Greedy speculative decoding with CUDA graphs (the SLM's decode graphs, the LLM's
    all-row catch-up graphs, rollbacks): the LLM's own greedy output."""
    _, graphed = pair
    prompts = random_prompts(4, 3, 30, seed=12)
    ref = graphed.generate(prompts, SamplingParams(max_tokens=20, ignore_eos=True, policy="llm"))
    for kw in (dict(num_draft_tokens=4), dict(num_draft_tokens=7, draft_confidence=0.5)):
        outs = graphed.generate(prompts, SamplingParams(max_tokens=20, ignore_eos=True, policy="speculative", **kw))
        assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
    assert any(len(k) == 4 for k in graphed.core.llm.graphs.graphs)
    assert_all_free(graphed)
