"""A whole decoder layer of a CPU decode step in one call of citer's extension.

On these CPUs an op called from Python costs 2-10 us before its kernel runs (the
binding's argument parsing, torch's dispatch, the Python wrapper's layout checks), and a
Llama / Qwen layer is about 20 of them (norms, projections, the q/k/v split and views,
rotary, the KV store, attention, SiLU and the product): at small shapes as much time as
the layer's weights take to stream. `CpuLayer` runs the same kernels in the same order
from C++ (csrc/cpu_layer.inc), so its outputs are the Python layer's bit for bit.

It takes the steps the kernels take: few rows (`rows_limit`: the linear kernel's rows for
the layer's weight dtypes, the attention kernel's rows per KV head), float32 or bfloat16
activations on the CPU, the KV cache in the activations' dtype; other steps, and
tensor-parallel ranks, run the Python layer.
"""
from typing import List, Optional, Tuple

import torch

from . import cpu_ext
from .linear import FAST_ROWS, KERNEL_ROWS
from .paged_attention import FAST_ATTENTION_ROWS

ACT_DTYPES = (torch.float32, torch.bfloat16)
MAX_HEAD_DIM = 256  # the attention kernel's largest head size


def projection(w: torch.Tensor, scale: Optional[torch.Tensor], bias: Optional[torch.Tensor]):
    """One linear layer's weights for the extension: w [N, K] (float32 | bfloat16 | int8), scale [N] (int8), bias [N]."""
    return cpu_ext.ext.Projection(w.contiguous(), scale, bias)


class CpuLayer:
    """One decoder layer's weights, held by the extension (the same tensors as the module's:
    taken once, so the module's weights must not be replaced afterwards, only updated in place)."""

    def __init__(self, input_norm: torch.Tensor, post_norm: torch.Tensor, eps: float,
                 q_norm: Optional[torch.Tensor], k_norm: Optional[torch.Tensor],
                 projections: List[Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]],  # qkv, o, gate_up, down
                 num_heads: int, num_kv_heads: int, head_dim: int, intermediate_size: int, scale: float):
        weight_dtypes = {w.dtype for w, _, _ in projections}
        norm_dtypes = {t.dtype for t in (input_norm, post_norm, q_norm, k_norm) if t is not None}
        self.group = num_heads // num_kv_heads
        # rows of x the kernels take, per activation dtype (0: none)
        self.rows = {dt: (min(KERNEL_ROWS.get((w, dt), FAST_ROWS) for w in weight_dtypes)
                          if cpu_ext.AVAILABLE and norm_dtypes == {dt} and head_dim <= MAX_HEAD_DIM and head_dim % 2 == 0
                          else 0) for dt in ACT_DTYPES}
        self.layer = cpu_ext.ext.DecoderLayer(input_norm.contiguous(), post_norm.contiguous(), float(eps), q_norm,
                                              k_norm, *(projection(*p) for p in projections), num_heads, num_kv_heads,
                                              head_dim, intermediate_size, float(scale))

    def fits(self, x: torch.Tensor, k_cache: torch.Tensor, max_query_len: int) -> bool:
        """Does a step with activations x [T, H], this KV cache and longest query take this path?"""
        return (x.device.type == "cpu" and 0 < x.shape[0] <= self.rows.get(x.dtype, 0) and k_cache.dtype == x.dtype
                and max_query_len * self.group <= FAST_ATTENTION_ROWS)

    def __call__(self, ops, x, residual, rope_cs, kv, meta) -> Tuple[torch.Tensor, torch.Tensor]:
        """DecoderLayer.forward's contract (ops unused): x [T, H], residual [T, H] or None (the
        first layer), rope_cs (cos, sin) [T, 1, D] -> (mlp output [T, H], residual [T, H])."""
        out, residual = self.layer(x, residual, rope_cs[0], rope_cs[1], kv[0], kv[1], meta.slot_mapping,
                                   meta.block_tables, meta.seq_lens, meta.query_start_loc)
        return out, residual


def share_limits(layers: List[CpuLayer]) -> List[CpuLayer]:
    """A model's layers with the tightest row limits of any of them, so that asking the first
    whether a step fits answers for all (they share the config and the KV cache's dtype)."""
    rows = {dt: min(c.rows[dt] for c in layers) for dt in ACT_DTYPES}
    for c in layers:
        c.rows = rows
    return layers
