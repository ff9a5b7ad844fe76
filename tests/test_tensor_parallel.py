"""The LLM split over 2 tensor-parallel ranks (gloo on CPU, a worker process spawned by the
engine): the same logits within float32 all-reduce tolerance and the same greedy tokens as
one rank, on Qwen2 (biases), Qwen3 (q/k norms) and Llama (GQA, KV heads split and
replicated); routed decoding equal token for token; each rank holds exactly its slices; a
worker killed mid-run fails the step with a clear error and leaves no process behind."""
import multiprocessing
import os
import signal
import time

import pytest
import torch

from citer import Engine, SamplingParams
from citer.engine.models import load_model
from citer.engine.models.tp import Shard
from citer.engine.tp_group import TPWorkerError
from conftest import build_hf_model, random_prompts

KW = dict(block_size=8, num_blocks=96, max_model_len=64, tp_timeout=60)


@pytest.fixture(scope="module")
def kv1_llama(tmp_path_factory):
    """Llama with one KV head for 4 query heads: replicated on both ranks."""
    path = str(tmp_path_factory.mktemp("llama_kv1"))
    build_hf_model(path, "llama", seed=5, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False)
    return path


def _children():
    return [p for p in multiprocessing.active_children() if p.name.startswith("citer-tp")]


def _logprob_rows(outs):
    return torch.tensor([[lp for _, lp in x.top] for o in outs for x in o.logprobs])


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "llama", "kv1"])
def test_two_ranks_equal_one(hf_models, kv1_llama, name):
    path = kv1_llama if name == "kv1" else hf_models[name][0]
    prompts = random_prompts(3, 3, 10, seed=4)
    params = SamplingParams(max_tokens=10, ignore_eos=True, policy="llm", logprobs=5)
    one = Engine(llm=path, **KW).generate(prompts, params)
    e = Engine(llm=path, llm_tensor_parallel_size=2, **KW)
    try:
        two = e.generate(prompts, params)
        sampled = SamplingParams(max_tokens=8, ignore_eos=True, policy="llm", temperature=0.9, seed=3)
        assert [o.token_ids for o in e.generate(prompts, sampled)] == \
            [o.token_ids for o in Engine(llm=path, **KW).generate(prompts, sampled)]  # Gumbel-max per vocab slice
    finally:
        e.close()
    assert [o.token_ids for o in two] == [o.token_ids for o in one]
    assert torch.allclose(_logprob_rows(two), _logprob_rows(one), atol=1e-4)
    assert not _children()


def test_two_ranks_int8(hf_models):
    """int8 with tensor parallelism: each rank quantizes its slices (a tied, vocab-parallel
    embedding gathered from its int8 rows). Column slices keep their rows' scales; row-parallel
    slices (o_proj, down_proj) get scales of their half rows, so the split model is its own
    int8 rounding: close to one process's int8 (on these random models within 0.15 nats,
    where int8 itself moves the float model's by up to 0.25: test_quantization.py), not equal."""
    path = hf_models["qwen2"][0]
    prompts = random_prompts(3, 3, 10, seed=5)
    params = SamplingParams(max_tokens=1, ignore_eos=True, policy="llm", logprobs=5)
    one = Engine(llm=path, quantization="int8", **KW).generate(prompts, params)
    e = Engine(llm=path, llm_tensor_parallel_size=2, quantization="int8", **KW)
    try:
        two = e.generate(prompts, params)
    finally:
        e.close()
    assert [o.token_ids for o in two] == [o.token_ids for o in one]
    assert torch.allclose(_logprob_rows(two), _logprob_rows(one), atol=0.15)
    assert not _children()


def test_routed_decoding_with_a_split_llm(hf_models, router_path):
    slm, llm = hf_models["qwen2"][0], hf_models["llama"][0]
    prompts = random_prompts(4, 3, 10, seed=6)
    one = Engine(slm, llm, router_path, **KW)
    two = Engine(slm, llm, router_path, llm_tensor_parallel_size=2, **KW)
    try:
        for p in (dict(policy="random", llm_fraction=0.4, seed=2), dict(policy="router", threshold=0.5),
                  dict(policy="speculative", num_draft_tokens=3)):
            params = SamplingParams(max_tokens=12, ignore_eos=True, **p)
            a, b = one.generate(prompts, params), two.generate(prompts, params)
            assert [(o.token_ids, o.from_llm) for o in b] == [(o.token_ids, o.from_llm) for o in a], p
        from citer.research.training.forcing import Forcer
        with pytest.raises(ValueError, match="LLM on one device"):  # teacher forcing drives one process's model
            Forcer.from_engine(two)
    finally:
        two.close()


def test_each_rank_loads_its_slices(hf_models):
    path = hf_models["qwen2"][0]
    full, cfg = load_model(path)
    fp = dict(full.named_parameters())
    q, kv, hd, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.head_dim, \
        cfg.intermediate_size
    for rank in (0, 1):
        part, _ = load_model(path, shard=Shard(rank, 2))
        pp = dict(part.named_parameters())
        qr, kr, ir = q // 2, kv // 2, inter // 2
        w = fp["layers.1.self_attn.qkv_proj.weight"]
        want = torch.cat([w[rank * qr:(rank + 1) * qr], w[q + rank * kr:q + (rank + 1) * kr],
                          w[q + kv + rank * kr:q + kv + (rank + 1) * kr]])
        assert torch.equal(pp["layers.1.self_attn.qkv_proj.weight"], want)
        assert torch.equal(pp["layers.0.self_attn.o_proj.weight"], fp["layers.0.self_attn.o_proj.weight"][:, rank * qr:
                                                                                                    (rank + 1) * qr])
        g = fp["layers.0.mlp.gate_up_proj.weight"]
        assert torch.equal(pp["layers.0.mlp.gate_up_proj.weight"],
                           torch.cat([g[rank * ir:(rank + 1) * ir], g[inter + rank * ir:inter + (rank + 1) * ir]]))
        assert torch.equal(pp["layers.0.mlp.down_proj.weight"], fp["layers.0.mlp.down_proj.weight"][:, rank * ir:
                                                                                                  (rank + 1) * ir])
        v = -(-cfg.vocab_size // 2)
        assert torch.equal(pp["embed_tokens.weight"], fp["embed_tokens.weight"][rank * v:(rank + 1) * v])
        assert torch.equal(pp["norm.weight"], fp["norm.weight"])
        assert hd == part.cfg.head_dim and part.cfg.num_heads == cfg.num_heads // 2


def test_a_killed_worker_fails_the_step_and_leaves_nothing(hf_models):
    path = hf_models["llama"][0]
    e = Engine(llm=path, llm_tensor_parallel_size=2, **{**KW, "tp_timeout": 20})
    params = SamplingParams(max_tokens=30, ignore_eos=True, policy="llm")
    rid = e.add_request([5, 6, 7], params)
    e.step()
    (worker,) = _children()
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(10)
    t0 = time.time()
    with pytest.raises(TPWorkerError, match="rank1 exited with code"):
        for _ in range(5):
            e.step()
    assert time.time() - t0 < 25
    assert e.block_manager.num_free_blocks == e.block_manager.num_blocks
    with pytest.raises(TPWorkerError, match="shut down"):
        e.generate([[5, 6]], params)
    e.close()
    assert not _children() and e.core.get(rid) is None


def test_models_on_their_own_devices(hf_models, router_path):
    """slm_device / llm_device: each runner's weights and KV pool on its device (two CPU
    devices of one type here; the GPU test puts them on cuda:0 and cuda:1)."""
    slm, llm = hf_models["qwen2"][0], hf_models["llama"][0]
    prompts = random_prompts(3, 3, 9, seed=8)
    params = SamplingParams(max_tokens=10, ignore_eos=True, policy="random", llm_fraction=0.4, seed=1)
    ref = Engine(slm, llm, router_path, **KW).generate(prompts, params)
    e = Engine(slm, llm, router_path, slm_device="cpu", llm_device="cpu", **KW)
    assert e.core.slm.device == e.core.llm.device == torch.device("cpu")
    assert [o.token_ids for o in e.generate(prompts, params)] == [o.token_ids for o in ref]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_slm_and_llm_on_two_gpus(hf_models, router_path):
    slm, llm = hf_models["qwen2"][0], hf_models["llama"][0]
    prompts = random_prompts(3, 3, 9, seed=8)
    params = SamplingParams(max_tokens=10, ignore_eos=True, policy="router", threshold=0.5)
    one = Engine(slm, llm, router_path, device="cuda:0", **KW).generate(prompts, params)
    e = Engine(slm, llm, router_path, slm_device="cuda:0", llm_device="cuda:1", **KW)
    assert e.core.slm.kv_cache[0][0].device.index == 0 and e.core.llm.kv_cache[0][0].device.index == 1
    assert [o.token_ids for o in e.generate(prompts, params)] == [o.token_ids for o in one]
