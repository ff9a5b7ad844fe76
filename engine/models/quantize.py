"""Weight-only int8 quantization of a loaded decoder (EngineArgs.quantization="int8").

Every projection of every layer (q/k/v, o, gate/up, down) becomes int8 with one float32
scale per output channel (kernels.linear.quantize_int8: symmetric, round to nearest): the
module keeps `qweight` [N, K] int8 and `qscale` [N] and loses its float weight, so a
decode step reads a quarter of the float32 bytes (half of bfloat16's). Activations,
norms, embeddings and the lm_head stay in the model's dtype (the lm_head also feeds the
router's head signals). The ops' linear computes x @ (q * scale).T with float32
accumulation: citer's CPU kernel for few rows, a dequantized F.linear otherwise (on CUDA
too: correct, not faster than bfloat16 there yet).
"""
import torch
from torch import nn

from citer.kernels.linear import quantize_int8

QUANTIZATIONS = ("int8",)
PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


@torch.no_grad()
def quantize_int8_(model: nn.Module) -> nn.Module:
    """Quantize a DecoderLM's layer projections in place; -> the model."""
    for layer in model.layers:
        for path in PROJECTIONS:
            mod = layer.get_submodule(path)
            q, scale = quantize_int8(mod.weight)
            device = mod.weight.device
            del mod.weight
            mod.register_buffer("qweight", q.to(device))
            mod.register_buffer("qscale", scale.to(device))
    return model
