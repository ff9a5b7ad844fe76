"""The linear op: y = x @ w.T (+ bias), with weights in float32, bfloat16 or int8.

int8 weights are per-output-channel (row) symmetric: w = q * scale[:, None], q int8 in
[-127, 127], scale [N] float32 (`quantize_int8`). `linear_ref` is the reference (torch's
F.linear; int8 weights dequantized to x's dtype first). `linear_cpu` takes the few-row
calls of decode steps and short catch-ups (x of at most 16 rows, fewer in bfloat16) to citer's AVX-512
kernel (csrc/cpu_linear.cpp), which streams each weight once at the memory bandwidth in
every dtype (torch's GEMV on these rows reads float32 below it and bfloat16 slower than
float32); larger calls, and CPUs without AVX-512 BF16, go to torch: the reference, or for int8 weights
citer's linear_int8_gemm (the reference's weights, dequantized a cached chunk at a time). Accumulation
is in float32 everywhere; both round the output to x's dtype.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import cpu_ext

FAST_ROWS = cpu_ext.ext.MAX_ROWS if cpu_ext.AVAILABLE else 0  # rows of x the CPU kernel takes at most
# Up to how many rows of x the kernel beats torch's GEMM, by (weight dtype, x dtype): past a few
# rows the kernel is bound by its multiply-adds, and oneDNN's bfloat16 GEMM has AMX
# (benchmarks/cpu_linear.py, 2 threads: bf16 1.0-1.1x at 6 rows, 0.9 at 8; int8 with bf16 x
# 1.1-1.25x at 12, 0.8-1.1 at 16; float32 1.3-1.5x still at 16)
KERNEL_ROWS = {(torch.bfloat16, torch.bfloat16): 6, (torch.int8, torch.bfloat16): 12}
KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # x's dtypes the CPU kernels take (float16: the reference)
REF_CHUNK_ROWS = 16384  # linear_ref dequantizes int8 weights this many rows at a time


def quantize_int8(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (q [N, K] int8, scale [N] float32), per-row symmetric, rounded to nearest."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def linear_ref(
    x: torch.Tensor,  # [M, K] float32 | bfloat16
    w: torch.Tensor,  # [N, K] float32 | bfloat16 | int8
    scale: Optional[torch.Tensor] = None,  # [N] float32 with int8 w
    bias: Optional[torch.Tensor] = None,  # [N]
) -> torch.Tensor:  # [M, N] in x's dtype
    b = None if bias is None else bias.to(x.dtype)
    if w.dtype != torch.int8:
        return F.linear(x, w.to(x.dtype), b)
    # int8: dequantized to x's dtype (through float32), REF_CHUNK_ROWS rows at a time so that
    # a large matrix (an lm_head) never has a whole float32 copy
    outs = [F.linear(x, (w[n:n + REF_CHUNK_ROWS].to(torch.float32) * scale[n:n + REF_CHUNK_ROWS, None]).to(x.dtype),
                     None if b is None else b[n:n + REF_CHUNK_ROWS]) for n in range(0, w.shape[0], REF_CHUNK_ROWS)]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def linear_cpu(x: torch.Tensor, w: torch.Tensor, scale: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """linear_ref's contract; few rows (KERNEL_ROWS, at most FAST_ROWS) on the CPU kernel, the rest on torch."""
    if (FAST_ROWS and x.device.type == "cpu" and w.is_contiguous() and x.dtype in KERNEL_DTYPES and x.shape[0] > 0
            and x.shape[1] > 0):
        if x.shape[0] <= KERNEL_ROWS.get((w.dtype, x.dtype), FAST_ROWS):
            return cpu_ext.ext.linear(x.contiguous(), w, scale, bias)
        if w.dtype == torch.int8:  # the reference's weights (bit for bit), a cached chunk at a time, on torch's GEMM
            return cpu_ext.ext.linear_int8_gemm(x.contiguous(), w, scale, bias)
    return linear_ref(x, w, scale, bias)
