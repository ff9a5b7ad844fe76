"""Rotary position embeddings of the new tokens' queries and keys.

x_rot = x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2]),
with cos / sin [T, 1, D] per token (citer.engine.models.rope tabulates them) in the
activations' dtype, each product and the sum rounded to it, as transformers'
apply_rotary_pos_emb does. `rotary_ref` is that composition; `rotary_cpu` runs it in one
call of citer's CPU kernel (csrc/cpu_rotary.inc) where it applies.
"""
from typing import Tuple

import torch

from . import cpu_ext


def rotary_ref(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    cos: torch.Tensor,  # [T, 1, D] in q's dtype
    sin: torch.Tensor,  # [T, 1, D] in q's dtype
) -> Tuple[torch.Tensor, torch.Tensor]:  # rotated (q, k)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_cpu(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """rotary_ref's contract; contiguous outputs."""
    d = q.shape[-1]
    if (cpu_ext.AVAILABLE and q.device.type == "cpu" and q.dim() == k.dim() == 3 and q.shape[0] == k.shape[0]
            and k.shape[2] == d and d % 2 == 0 and q.dtype in (torch.float32, torch.bfloat16)
            and q.dtype == k.dtype == cos.dtype == sin.dtype and cos.is_contiguous() and sin.is_contiguous()
            and cos.numel() == sin.numel() == q.shape[0] * d
            and all(x.stride(2) == 1 and x.stride(1) == d for x in (q, k))):
        q_rot, k_rot = cpu_ext.ext.rotary(q, k, cos, sin)
        return q_rot, k_rot
    return rotary_ref(q, k, cos, sin)
