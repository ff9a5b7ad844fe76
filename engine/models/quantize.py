"""Weight-only int8 quantization of a loaded decoder (EngineArgs.quantization="int8").

Every projection of every layer (q/k/v, o, gate/up, down) and the lm_head become int8
with one float32 scale per output channel (kernels.linear.quantize_int8: symmetric, round
to nearest): the module keeps `qweight` [N, K] int8 and `qscale` [N] and loses its float
weight, so a decode step reads a quarter of the float32 bytes (half of bfloat16's). A
tied embedding is the lm_head's table, so it becomes the same int8 table (one copy; its
rows are dequantized when gathered: DecoderLM.embed); an untied embedding stays in the
model's dtype (a step reads one row of it per token). Activations and norms stay in the
model's dtype. The ops' linear computes x @ (q * scale).T with float32 accumulation:
citer's CPU kernel for few rows, dequantized chunks into torch's GEMM for many; the fused
head (Triton) multiplies each logit by its row's scale after the dot. The lm_head's
rounding also moves the head's signals a head-signal router reads (measured:
benchmarks/int8_accuracy.py).
"""
import torch
from torch import nn

from citer.kernels.linear import quantize_int8

QUANTIZATIONS = ("int8",)
PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


@torch.no_grad()
def quantize_int8_(model: nn.Module) -> nn.Module:
    """Quantize a DecoderLM's layer projections and lm_head (and a tied embedding) in place; -> the model."""
    for layer in model.layers:
        for path in PROJECTIONS:
            _quantize_module(layer.get_submodule(path))
    tied = model.embed_tokens.weight is model.lm_head.weight
    q, scale = _quantize_module(model.lm_head)
    if tied:
        del model.embed_tokens.weight
        model.embed_tokens.register_buffer("qweight", q)
        model.embed_tokens.register_buffer("qscale", scale)
    return model


def _quantize_module(mod: nn.Module):
    """mod.weight -> buffers qweight [N, K] int8 and qscale [N] float32 (the float weight dropped)."""
    q, scale = quantize_int8(mod.weight)
    device = mod.weight.device
    del mod.weight
    q, scale = q.to(device), scale.to(device)
    mod.register_buffer("qweight", q)
    mod.register_buffer("qscale", scale)
    return q, scale
