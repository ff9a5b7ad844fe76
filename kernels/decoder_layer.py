"""A whole decoder layer of a CPU decode step in one call of citer's extension.

On these CPUs an op called from Python costs 2-10 us before its kernel runs (the
binding's argument parsing, torch's dispatch, the Python wrapper's layout checks), and a
Llama / Qwen layer is about 20 of them (norms, projections, the q/k/v split and views,
rotary, the KV store, attention, SiLU and the product): at small shapes as much time as
the layer's weights take to stream. `CpuLayer` runs the same kernels in the same order
from C++ (csrc/cpu_layer.inc), each projection on the path linear_cpu would take (the
few-row kernel up to KERNEL_ROWS, torch's GEMM past it), so its outputs are the Python
layer's bit for bit.

It takes the steps the attention kernel takes (query rows x query heads per KV head up to
its limit: decode steps of any batch, short catch-ups) with float32 or bfloat16
activations on the CPU, the weights in that dtype or int8 and the KV cache in it; other
steps (prefills), and tensor-parallel ranks, run the Python layer.
"""
from typing import List, Optional, Tuple

import torch

from . import cpu_ext
from .linear import FAST_ROWS, KERNEL_ROWS
from .paged_attention import FAST_ATTENTION_ROWS

ACT_DTYPES = (torch.float32, torch.bfloat16)
MAX_HEAD_DIM = 256  # the attention kernel's largest head size

Weights = Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]  # (w [N, K], int8 scale [N], bias [N])


class CpuLayer:
    """One decoder layer's weights, held by the extension (the module's own tensors, not
    copies: they may change in place afterwards; DecoderLM.cpu_layers rebuilds these when
    the first projection's weight tensor is replaced, as quantize_int8_ does)."""

    def __init__(self, input_norm: torch.Tensor, post_norm: torch.Tensor, eps: float,
                 q_norm: Optional[torch.Tensor], k_norm: Optional[torch.Tensor],
                 projections: List[Weights],  # qkv, o, gate_up, down
                 num_heads: int, num_kv_heads: int, head_dim: int, intermediate_size: int, scale: float):
        self.dtype = input_norm.dtype  # the activations' dtype (the model's)
        self.group = num_heads // num_kv_heads
        norms = [t for t in (input_norm, post_norm, q_norm, k_norm) if t is not None]
        self.ok = (cpu_ext.AVAILABLE and self.dtype in ACT_DTYPES and head_dim <= MAX_HEAD_DIM and head_dim % 2 == 0
                   and all(t.dtype == self.dtype and t.is_contiguous() for t in norms)
                   and all(w.dtype in (self.dtype, torch.int8) and w.is_contiguous() for w, _, _ in projections))
        self.layer = None
        if self.ok:  # the tensors themselves (contiguous: the kernels' layout), never copies
            self.layer = cpu_ext.ext.DecoderLayer(
                input_norm, post_norm, float(eps), q_norm, k_norm,
                *(cpu_ext.ext.Projection(w, s, b, KERNEL_ROWS.get((w.dtype, self.dtype), FAST_ROWS))
                  for w, s, b in projections),
                num_heads, num_kv_heads, head_dim, intermediate_size, float(scale))

    def fits(self, x: torch.Tensor, kv, meta) -> bool:
        """Does a step with activations x [T, H], this layer's KV cache (k, v) and metadata take this path?"""
        k_cache, v_cache = kv
        return (self.ok and x.dtype == self.dtype and x.device.type == "cpu" and x.shape[0] > 0
                and k_cache.dtype == v_cache.dtype == self.dtype and k_cache.is_contiguous()
                and v_cache.is_contiguous() and meta.slot_mapping.is_contiguous()
                and meta.max_query_len * self.group <= FAST_ATTENTION_ROWS)

    def __call__(self, ops, x, residual, rope_cs, kv, meta) -> Tuple[torch.Tensor, torch.Tensor]:
        """DecoderLayer.forward's contract (ops unused): x [T, H], residual [T, H] or None (the
        first layer), rope_cs (cos, sin) [T, 1, D] -> (mlp output [T, H], residual [T, H])."""
        out, residual = self.layer(x, residual, rope_cs[0], rope_cs[1], kv[0], kv[1], meta.slot_mapping,
                                   meta.block_tables, meta.seq_lens, meta.query_start_loc)
        return out, residual


def all_or_none(layers: List[CpuLayer]) -> List[CpuLayer]:
    """A model's layers, each taking a step only if all can, so that asking the first
    whether a step fits answers for all (they share the config and the KV cache's dtype)."""
    ok = all(c.ok for c in layers)
    for c in layers:
        c.ok = ok
    return layers
