"""A decoder layer in one call of the CPU extension (kernels/decoder_layer.py) against the
Python layer it replaces: the same kernels in the same order, so the same bits, for every
model family (biases, q/k norms, GQA, an odd head size), every weight dtype and a ragged
batch of decode steps and short catch-ups on permuted block tables."""
import dataclasses

import pytest
import torch

from citer.engine.models import load_model
from citer.engine.models.attention import AttentionMetadata
from citer.engine.models.quantize import quantize_int8_
from citer.kernels import cpu_ext
from citer.kernels.decoder_layer import CpuLayer
from citer.kernels.ops import get_ops
from conftest import MODEL_CONFIGS, random_prompts

pytestmark = pytest.mark.skipif(not cpu_ext.AVAILABLE, reason="needs citer's AVX-512 CPU kernels")

FUSED = get_ops("torch")
PER_OP = dataclasses.replace(FUSED, cpu_layers=False)
BLOCK = 8


def _steps(model, cfg, ops, prompts, cached, dtype, seed=0):
    """Prefill prompts[b][:cached[b]], then forward the rest of every prompt as one ragged
    batch -> (hidden states [T, H] of that batch, the KV cache)."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = 8 * len(prompts)
    kv = [(torch.zeros(num_blocks, BLOCK, cfg.num_kv_heads, cfg.head_dim, dtype=dtype),
           torch.zeros(num_blocks, BLOCK, cfg.num_kv_heads, cfg.head_dim, dtype=dtype)) for _ in range(cfg.num_layers)]
    max_blocks = max(-(-len(p) // BLOCK) for p in prompts)
    tables = torch.randperm(num_blocks, generator=g)[: len(prompts) * max_blocks].view(len(prompts), max_blocks).int()

    def run(starts, ends):
        ids = torch.cat([torch.tensor(p[a:b], dtype=torch.long) for p, a, b in zip(prompts, starts, ends)])
        pos = torch.cat([torch.arange(a, b) for a, b in zip(starts, ends)])
        seq_of = torch.cat([torch.full((b - a,), i) for i, (a, b) in enumerate(zip(starts, ends))])
        q_lens = torch.tensor([b - a for a, b in zip(starts, ends)])
        qsl = torch.zeros(len(prompts) + 1, dtype=torch.int32)
        qsl[1:] = q_lens.cumsum(0)
        meta = AttentionMetadata(tables[seq_of, pos // BLOCK].long() * BLOCK + pos % BLOCK, tables,
                                 torch.tensor(ends, dtype=torch.int32), qsl, int(q_lens.max()), max(ends))
        with torch.inference_mode():
            return model(ops, ids, pos, kv, meta)

    run([0] * len(prompts), list(cached))
    return run(list(cached), [len(p) for p in prompts]), kv


@pytest.mark.parametrize("weights", ["float32", "bfloat16", "int8-float32", "int8-bfloat16"])
@pytest.mark.parametrize("name", list(MODEL_CONFIGS))
def test_one_call_layer_equals_the_python_layer(hf_models, name, weights, monkeypatch):
    """A ragged batch of a decode step and two catch-ups (6 rows: the few-row kernel), 20
    sequences' decode steps with one catch-up (22 rows: past the kernel's rows, torch's
    GEMM for every dtype), and short prefills (many rows, short queries)."""
    dtype = "bfloat16" if weights.endswith("bfloat16") else "float32"
    model, cfg = load_model(hf_models[name][0], dtype=dtype, max_positions=512)
    if weights.startswith("int8"):
        quantize_int8_(model)
    calls = []
    real_call = CpuLayer.__call__
    monkeypatch.setattr(CpuLayer, "__call__", lambda self, *a: calls.append(1) or real_call(self, *a))
    for n, new, lo, hi in ((3, [1, 3, 2], 40, 60), (20, [1] * 19 + [3], 40, 60), (2, [1, 2], 9, 14)):
        # prompts of 40+ tokens: prefills too long for the attention kernel (the Python
        # layers); of 9-14 tokens: short prefills, which take the one-call layers too
        prompts = random_prompts(n, lo, hi, seed=n)
        cached = [len(p) - k for p, k in zip(prompts, new)]
        calls.clear()
        fused, kv_fused = _steps(model, cfg, FUSED, prompts, cached, getattr(torch, dtype))
        assert len(calls) == cfg.num_layers * (1 if lo == 40 else 2)
        calls.clear()
        per_op, kv_per_op = _steps(model, cfg, PER_OP, prompts, cached, getattr(torch, dtype))
        assert not calls
        assert torch.equal(fused, per_op), n
        for (kf, vf), (kp, vp) in zip(kv_fused, kv_per_op):
            assert torch.equal(kf, kp) and torch.equal(vf, vp)


def test_which_steps_take_the_one_call_layers(hf_models):
    """Decode steps of any batch and short catch-ups do; prefills (long queries), a KV cache
    in another dtype, ops without the extension's layers and the Triton ops do not."""
    model, cfg = load_model(hf_models["llama"][0], dtype="bfloat16", max_positions=512)
    bf16_cache = [(torch.zeros(1, dtype=torch.bfloat16),) * 2]
    for rows in (1, 64):
        x = torch.zeros(rows, cfg.hidden_size, dtype=torch.bfloat16)
        layers = model.cpu_layers(FUSED, x, bf16_cache, _meta(1))
        assert layers is not None and len(layers) == cfg.num_layers
    one = torch.zeros(1, cfg.hidden_size, dtype=torch.bfloat16)
    assert model.cpu_layers(FUSED, one, bf16_cache, _meta(4)) is not None  # a short catch-up
    assert model.cpu_layers(FUSED, one, bf16_cache, _meta(64)) is None  # a prefill
    assert model.cpu_layers(FUSED, one, [(torch.zeros(1),) * 2], _meta(1)) is None  # a float32 cache
    assert model.cpu_layers(FUSED, one.float(), [(torch.zeros(1),) * 2], _meta(1)) is None  # float32 activations
    assert model.cpu_layers(PER_OP, one, bf16_cache, _meta(1)) is None
    assert model.cpu_layers(get_ops("triton"), one, bf16_cache, _meta(1)) is None


def test_weights_replaced_after_a_step_are_the_ones_used(hf_models):
    """The one-call layers hold the modules' tensors; quantizing after a step (new tensors)
    rebuilds them, so the next step uses the int8 weights, as the Python layers do."""
    model, cfg = load_model(hf_models["qwen2"][0], max_positions=512)
    prompts = random_prompts(2, 12, 14, seed=9)
    cached = [len(p) - 1 for p in prompts]
    _steps(model, cfg, FUSED, prompts, cached, torch.float32)
    quantize_int8_(model)
    fused, _ = _steps(model, cfg, FUSED, prompts, cached, torch.float32)
    per_op, _ = _steps(model, cfg, PER_OP, prompts, cached, torch.float32)
    assert torch.equal(fused, per_op)


def test_projection_checks_its_arguments():
    with pytest.raises(RuntimeError, match="int8 weights need a scale"):
        cpu_ext.ext.Projection(torch.zeros(4, 4, dtype=torch.int8), None, None, 4)
    with pytest.raises(RuntimeError, match="at most"):
        cpu_ext.ext.Projection(torch.zeros(4, 4), None, None, 1000)


def test_kernels_refuse_what_they_would_misread():
    """The CPU kernels check what their pointer arithmetic assumes (a helper's fuzzing found
    each of these read or written out of bounds): a bias or scale not [N], caches of another
    head size or dtype, block-table entries past the cache, a v_cache of another dtype; the
    attention wrapper takes the reference for strided caches, which the kernel cannot read."""
    from citer.kernels.paged_attention import paged_attention_cpu, paged_attention_ref

    x, w = torch.randn(3, 64), torch.randn(64, 64)
    with pytest.raises(RuntimeError, match="bias \\[N\\]"):
        cpu_ext.ext.linear(x, w, None, torch.zeros(3))
    with pytest.raises(RuntimeError, match="scale \\[N\\]"):
        cpu_ext.ext.linear(x, torch.zeros(64, 64, dtype=torch.int8), torch.ones(1), None)
    g = torch.Generator().manual_seed(0)
    buf = torch.randn(4, 8, 2, 2, 16, generator=g)  # K and V interleaved in one buffer: strided views
    k_cache, v_cache = buf[:, :, :, 0], buf[:, :, :, 1]
    q = torch.randn(2, 4, 16, generator=g)
    tables, lens, qsl = torch.tensor([[2, 0], [1, 3]], dtype=torch.int32), torch.tensor([12, 9]), torch.tensor([0, 1, 2])
    args = (tables, lens.int(), qsl.int(), 0.25, 1, 12)
    assert torch.allclose(paged_attention_cpu(q, k_cache, v_cache, *args), paged_attention_ref(q, k_cache, v_cache,
                                                                                                 *args), atol=1e-6)
    k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
    with pytest.raises(RuntimeError, match="of q's D and dtype"):
        cpu_ext.ext.paged_attention(q[..., :8].contiguous(), k_cache, v_cache, tables, lens.int(), qsl.int(), 0.25)
    with pytest.raises(RuntimeError, match="past the cache's 4"):
        cpu_ext.ext.paged_attention(q, k_cache, v_cache, torch.tensor([[2, 0], [1, 7]], dtype=torch.int32),
                                    lens.int(), qsl.int(), 0.25)
    key = torch.randn(1, 2, 16)
    with pytest.raises(RuntimeError, match="contiguous caches"):
        cpu_ext.ext.store_kvcache(key, key, k_cache, v_cache.bfloat16(), torch.tensor([3]))


def _meta(max_query_len):
    z = torch.zeros(1, dtype=torch.int32)
    return AttentionMetadata(z.long(), z[None], z, z, max_query_len, 1)
