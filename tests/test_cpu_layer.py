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
    """Prefill prompts[b][:cached[b]] (many rows: the Python layers), then forward the rest
    of every prompt as one ragged batch -> (hidden states [T, H] of that batch, the KV cache)."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = 32
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
    dtype = "bfloat16" if weights.endswith("bfloat16") else "float32"
    model, cfg = load_model(hf_models[name][0], dtype=dtype, max_positions=512)
    if weights.startswith("int8"):
        quantize_int8_(model)
    prompts = random_prompts(3, 9, 30, seed=3)
    cached = [len(prompts[0]) - 1, len(prompts[1]) - 3, len(prompts[2]) - 2]  # a decode step, two catch-ups
    calls = []
    real_call = CpuLayer.__call__
    monkeypatch.setattr(CpuLayer, "__call__", lambda self, *a: calls.append(1) or real_call(self, *a))
    fused, kv_fused = _steps(model, cfg, FUSED, prompts, cached, getattr(torch, dtype))
    assert len(calls) == cfg.num_layers  # the second pass (6 rows) took the one-call layers, the prefill did not
    calls.clear()
    per_op, kv_per_op = _steps(model, cfg, PER_OP, prompts, cached, getattr(torch, dtype))
    assert not calls
    assert torch.equal(fused, per_op)
    for (kf, vf), (kp, vp) in zip(kv_fused, kv_per_op):
        assert torch.equal(kf, kp) and torch.equal(vf, vp)


def test_steps_past_the_kernels_limits_take_the_python_layers(hf_models):
    model, cfg = load_model(hf_models["llama"][0], dtype="bfloat16", max_positions=512)
    layers = model.cpu_layers(FUSED, torch.zeros(1, cfg.hidden_size, dtype=torch.bfloat16),
                              [(torch.zeros(1, dtype=torch.bfloat16),) * 2], _meta(1))
    assert layers is not None and len(layers) == cfg.num_layers
    limit = layers[0].rows[torch.bfloat16]
    assert 0 < limit < 16
    too_many = torch.zeros(limit + 1, cfg.hidden_size, dtype=torch.bfloat16)
    assert model.cpu_layers(FUSED, too_many, [(torch.zeros(1, dtype=torch.bfloat16),) * 2], _meta(1)) is None
    one = torch.zeros(1, cfg.hidden_size, dtype=torch.bfloat16)
    assert model.cpu_layers(FUSED, one, [(torch.zeros(1),) * 2], _meta(1)) is None  # a float32 cache
    assert model.cpu_layers(FUSED, one, [(torch.zeros(1, dtype=torch.bfloat16),) * 2], _meta(64)) is None  # long query
    assert model.cpu_layers(PER_OP, one, [(torch.zeros(1, dtype=torch.bfloat16),) * 2], _meta(1)) is None
    assert model.cpu_layers(get_ops("triton"), one, [(torch.zeros(1, dtype=torch.bfloat16),) * 2], _meta(1)) is None


def _meta(max_query_len):
    z = torch.zeros(1, dtype=torch.int32)
    return AttentionMetadata(z.long(), z[None], z, z, max_query_len, 1)
