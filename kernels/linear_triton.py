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
scaled float32 partial sums one small kernel adds (with the bias, cast to the output
dtype); calls with many tiles run one program per tile. Past MAX_KERNEL_ROWS rows
(prefills, compute-bound) the reference's cuBLAS GEMM is the better path and takes them.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from .linear import linear_ref
from .triton_utils import dot_fp32, interpreting, sm_count

BLOCK_N = 64  # output features per tile
BLOCK_K = 128  # reduction chunk per loop step (bf16 / fp16 dots)
BLOCK_K_FP32 = 32  # the same for float32 dots (FMA in registers: 128 spills on sm_90)
PROGRAMS_PER_SM = 4  # split K until about this many programs per SM are in flight
MIN_CHUNKS_PER_SPLIT = 2  # ... but give each split at least this many chunks
MAX_KERNEL_ROWS = 64  # more rows (prefills): the reference's dequantize + cuBLAS GEMM, compute-bound there
REDUCE_BLOCK = 1024


@triton.jit
def _linear_int8_kernel(
    x_ptr,  # [M, K] float32 | float16 | bfloat16, row stride x_stride, unit stride along K
    q_ptr,  # [N, K] int8, contiguous
    scale_ptr,  # [N] float32: row n's weights are q[n] * scale[n]
    bias_ptr,  # [N] (unused without HAS_BIAS)
    out_ptr,  # IS_SPLIT: [num_splits, M, N] float32 partial sums (scaled); else [M, N] in x's dtype
    M,
    N,
    K,
    x_stride,
    K_PER_SPLIT,  # reduction length per split, a multiple of BLOCK_K
    HAS_BIAS: tl.constexpr,  # (not with IS_SPLIT: the reduce kernel adds it)
    IS_SPLIT: tl.constexpr,
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
    acc = acc * tl.load(scale_ptr + cols, mask=cmask, other=1.0)[None, :]
    omask = rmask[:, None] & cmask[None, :]
    if IS_SPLIT:
        base = out_ptr + split.to(tl.int64) * M * N
        tl.store(base + rows64[:, None] * N + cols64[None, :], acc, mask=omask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows64[:, None] * N + cols64[None, :], acc.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _split_reduce_kernel(
    part_ptr,  # [num_splits, M, N] float32 partial sums
    bias_ptr,  # [N] (unused without HAS_BIAS)
    out_ptr,  # [M, N] in x's dtype, contiguous
    MN,  # M * N
    N,
    num_splits,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, num_splits):
        acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def linear_triton(x: torch.Tensor, w: torch.Tensor, scale: Optional[torch.Tensor] = None,
                  bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """linear_ref's contract on CUDA: float weights through F.linear, int8 weights through the
    kernel for up to MAX_KERNEL_ROWS rows (decode, catch-ups), the reference past it."""
    if w.dtype != torch.int8 or x.dim() != 2 or x.shape[0] > MAX_KERNEL_ROWS:
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
    fp32 = dot_fp32(x.dtype)
    block_k = BLOCK_K_FP32 if fp32 else BLOCK_K
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    tiles = triton.cdiv(n, BLOCK_N) * triton.cdiv(m, block_m)
    k_blocks = triton.cdiv(k, block_k)
    if split_k is None:
        programs = 2 * PROGRAMS_PER_SM if interpreting() else PROGRAMS_PER_SM * sm_count(x.device)
        split_k = min(k_blocks // MIN_CHUNKS_PER_SPLIT, programs // tiles)
    split_k = max(1, min(int(split_k), k_blocks))
    k_per_split = triton.cdiv(k_blocks, split_k) * block_k
    split_k = triton.cdiv(k, k_per_split)  # no empty splits
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    part = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device) if split_k > 1 else out
    grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(m, block_m), split_k)
    _linear_int8_kernel[grid](x, q, scale, bias if bias is not None else scale, part, m, n, k, x.stride(0),
                              k_per_split, HAS_BIAS=bias is not None, IS_SPLIT=split_k > 1, DOT_FP32=fp32,
                              BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=block_k,
                              num_warps=8 if fp32 and block_m == 64 else 4)  # 4 warps spill float32 64-row tiles
    if split_k > 1:
        _split_reduce_kernel[(triton.cdiv(m * n, REDUCE_BLOCK),)](
            part, bias if bias is not None else scale, out, m * n, n, split_k, HAS_BIAS=bias is not None,
            BLOCK=REDUCE_BLOCK)
    return out
