"""The linear op on CUDA: float weights on cuBLAS (F.linear), int8 weights through a
weight-only Triton kernel that reads each int8 weight once.

The reference (`linear_ref`) dequantizes an int8 matrix to the activations' dtype before
its GEMM: per call it reads the int8 weights, writes and reads them again at two bytes
each, five bytes per weight against the one a decode step needs. `_linear_int8_kernel`
loads int8 tiles, widens them in registers (exact: |q| <= 127 in every float dtype), takes
the tile's dot with the activations in float32 and multiplies each output by its row's
scale after the dot (as the CPU kernel does), so it differs from the reference only by
the reference's rounding of q * scale to the activations' dtype.

Few rows (a decode step) give few output tiles, too few programs to keep a GPU's memory
busy, so K is split over `split_k` programs per tile (sized from the SM count) whose
float32 partial sums are added afterwards; large calls run one program per tile.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from .linear import linear_ref
from .triton_utils import dot_fp32, interpreting, sm_count

BLOCK_N = 64  # output features per tile
BLOCK_K = 128  # reduction chunk per loop step
PROGRAMS_PER_SM = 4  # split K until about this many programs per SM are in flight


@triton.jit
def _linear_int8_kernel(
    x_ptr,  # [M, K] float32 | float16 | bfloat16, row stride x_stride, unit stride along K
    q_ptr,  # [N, K] int8, contiguous
    scale_ptr,  # [N] float32: row n's weights are q[n] * scale[n]
    bias_ptr,  # [N] (unused without HAS_BIAS)
    out_ptr,  # SPLIT_K == 1: [M, N] in x's dtype; else [SPLIT_K, M, N] float32 partial sums
    M,
    N,
    K,
    x_stride,
    K_PER_SPLIT,  # reduction length per split, a multiple of BLOCK_K
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,  # >= 16 (tl.dot)
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n, pid_m, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask, cmask = rows < M, cols < N
    rows64, cols64 = rows.to(tl.int64), cols.to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_start = split * K_PER_SPLIT
    for k0 in range(k_start, tl.minimum(k_start + K_PER_SPLIT, K), BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        kmask = offs < K
        x = tl.load(x_ptr + rows64[:, None] * x_stride + offs[None, :], mask=rmask[:, None] & kmask[None, :],
                    other=0.0)
        q = tl.load(q_ptr + cols64[:, None] * K + offs[None, :], mask=cmask[:, None] & kmask[None, :], other=0)
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), tl.trans(q.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(q.to(x.dtype)))
    omask = rmask[:, None] & cmask[None, :]
    if SPLIT_K == 1:
        acc = acc * tl.load(scale_ptr + cols, mask=cmask, other=1.0)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows64[:, None] * N + cols64[None, :], acc.to(out_ptr.dtype.element_ty), mask=omask)
    else:
        base = out_ptr + split.to(tl.int64) * M * N
        tl.store(base + rows64[:, None] * N + cols64[None, :], acc, mask=omask)


def linear_triton(x: torch.Tensor, w: torch.Tensor, scale: Optional[torch.Tensor] = None,
                  bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """linear_ref's contract on CUDA: float weights through F.linear, int8 weights through the kernel."""
    if w.dtype != torch.int8:
        return linear_ref(x, w, scale, bias)
    return linear_int8_triton(x, w, scale, bias)


def linear_int8_triton(
    x: torch.Tensor,  # [M, K] float32 | float16 | bfloat16
    q: torch.Tensor,  # [N, K] int8
    scale: torch.Tensor,  # [N] float32
    bias: Optional[torch.Tensor] = None,  # [N]
    split_k: Optional[int] = None,  # programs per output tile along K (None: sized from the SM count)
) -> torch.Tensor:  # [M, N] in x's dtype
    if x.dim() != 2 or q.dim() != 2 or x.shape[1] != q.shape[1]:
        raise ValueError(f"linear_int8_triton: x [M, K] and q [N, K] expected, got {tuple(x.shape)}, {tuple(q.shape)}")
    if scale is None or scale.dtype != torch.float32 or scale.shape != (q.shape[0],) or scale.device != q.device:
        raise ValueError("linear_int8_triton: int8 weights need float32 scales [N] on their device")
    m, k = x.shape
    n = q.shape[0]
    if m == 0 or k == 0:
        return linear_ref(x, q, scale, bias)
    x = x if x.stride(1) == 1 else x.contiguous()
    q = q.contiguous()
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    tiles = triton.cdiv(n, BLOCK_N) * triton.cdiv(m, block_m)
    k_blocks = triton.cdiv(k, BLOCK_K)
    if split_k is None:
        programs = 2 * PROGRAMS_PER_SM if interpreting() else PROGRAMS_PER_SM * sm_count(x.device)
        split_k = min(k_blocks, max(1, programs // tiles))
    split_k = max(1, min(int(split_k), k_blocks))
    k_per_split = triton.cdiv(k_blocks, split_k) * BLOCK_K
    split_k = triton.cdiv(k, k_per_split)  # no empty splits
    if split_k == 1:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    else:
        out = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(m, block_m), split_k)
    _linear_int8_kernel[grid](x, q, scale, bias if bias is not None else scale, out, m, n, k, x.stride(0),
                              k_per_split, HAS_BIAS=bias is not None and split_k == 1, SPLIT_K=split_k,
                              DOT_FP32=dot_fp32(x.dtype), BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    if split_k == 1:
        return out
    y = out.sum(0).mul_(scale)
    if bias is not None:
        y.add_(bias.float())
    return y.to(x.dtype)
