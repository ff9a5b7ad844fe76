"""RMSNorm with the residual add fused (the Llama/Qwen pre-norm pattern).

With a residual: residual_out = x + residual; out = rmsnorm(residual_out) * weight.
The add happens in the input dtype and the normalisation in float32, exactly as
transformers' LlamaRMSNorm / Qwen2RMSNorm do, so results match them bit for bit on CPU.
The Triton kernel does one row per program; `rms_norm_cpu` runs CPU rows in one call of
citer's AVX-512 kernel (csrc/cpu_norm.inc) where it applies, the reference elsewhere.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import cpu_ext


def rms_norm_ref(
    x: torch.Tensor,  # [T, H]
    weight: torch.Tensor,  # [H]
    eps: float,
    residual: Optional[torch.Tensor] = None,  # [T, H]
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    if residual is not None:
        x = x + residual
        residual = x
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype), residual


def rms_norm_cpu(
    x: torch.Tensor,  # [T, H] float32 | bfloat16, unit stride along H
    weight: torch.Tensor,  # [H] in x's dtype
    eps: float,
    residual: Optional[torch.Tensor] = None,  # [T, H] in x's dtype
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """rms_norm_ref's contract, in one kernel call on CPUs with AVX-512 BF16."""
    if rms_norm_fits(x, weight) and (residual is None or (residual.dtype == x.dtype and residual.shape == x.shape
                                                          and residual.stride(-1) == 1)):
        out = cpu_ext.ext.rms_norm(x, weight, float(eps), residual)
        return out[0], (out[1] if residual is not None else None)
    return rms_norm_ref(x, weight, eps, residual)


def rms_norm_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Does the CPU kernel take this x [T, H] and weight [H] (the residual aside)?"""
    return (cpu_ext.AVAILABLE and x.device.type == "cpu" and x.dim() == 2 and x.dtype in (torch.float32, torch.bfloat16)
            and weight.dtype == x.dtype and weight.is_contiguous() and weight.numel() == x.shape[1]
            and x.stride(-1) == 1 and x.shape[0] > 0)


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [T, H], row stride x_stride
    residual_ptr,  # [T, H], row stride res_stride (unused without HAS_RESIDUAL)
    out_ptr,  # [T, H] contiguous
    residual_out_ptr,  # [T, H] contiguous (unused without HAS_RESIDUAL)
    weight_ptr,  # [H]
    x_stride,
    res_stride,
    H,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,  # next power of two >= H
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * x_stride + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * res_stride + offs, mask=mask, other=0.0).to(tl.float32)
        x = (x + r).to(dtype).to(tl.float32)  # the add rounds to the input dtype, as in torch
        tl.store(residual_out_ptr + row * H + offs, x.to(dtype), mask=mask)
    var = tl.sum(x * x, axis=0) / H
    y = (x * tl.rsqrt(var + eps)).to(dtype).to(tl.float32)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * H + offs, (w * y).to(dtype), mask=mask)


def _num_warps(hidden: int) -> int:
    return min(8, max(1, triton.next_power_of_2(hidden) // 256))


def rms_norm_triton(x, weight, eps, residual=None):
    """Same contract as rms_norm_ref. x / residual: unit stride along H (rows may be
    strided); weight in x's dtype; returns contiguous out and residual_out."""
    if x.stride(-1) != 1 or (residual is not None and residual.stride(-1) != 1):
        raise ValueError("rms_norm needs unit stride along the hidden dim")
    rows, hidden = x.shape
    out = torch.empty((rows, hidden), dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out) if residual is not None else out
    if rows:
        _rms_norm_kernel[(rows,)](
            x, residual if residual is not None else x, out, res_out, weight,
            x.stride(0), residual.stride(0) if residual is not None else 0, hidden, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(hidden),
            num_warps=_num_warps(hidden),
        )
    return out, (res_out if residual is not None else None)
