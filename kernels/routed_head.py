"""Routed head: final RMSNorm + lm_head + argmax/sample + the router MLP in one pass.

Returns, per row, the SLM's token, the SLM's top probability (softmax of the raw
logits, the "confidence" baseline's signal) and the router score
p = sigmoid(relu(h @ W1.T + b1) @ w2 + b2) on the normed hidden state h (the folded
CITER router; see citer.router). The Triton kernel never materialises [B, vocab]
logits; this reference does, and is what runs on CPU.

Sampling rows (temperature > 0) use the Gumbel-max trick: token = argmax(logits / T + G),
G ~ Gumbel(0, 1), drawn here from a torch.Generator seeded with seeds[b] (the Triton
kernel draws G from Philox with the same seed, so the two agree in distribution, not
sample for sample).
"""
from typing import Optional, Tuple

import torch

from .rmsnorm import rms_norm_ref


def router_mlp_ref(
    h: torch.Tensor,  # [B, H] normed hidden state
    w1: torch.Tensor,  # [R, H]
    b1: torch.Tensor,  # [R]
    w2: torch.Tensor,  # [R]
    b2: torch.Tensor,  # [] or [1]
) -> torch.Tensor:  # [B] float32 in (0, 1)
    z = torch.addmm(b1, h.float(), w1.t()).relu_()  # params are float32 (FoldedRouter.to)
    return torch.sigmoid(torch.mv(z, w2).add_(b2))


def gumbel_noise(seed: int, vocab: int) -> torch.Tensor:  # [V] float32
    g = torch.Generator().manual_seed(int(seed))
    u = torch.rand(vocab, generator=g, dtype=torch.float32).clamp_(min=1e-20)
    return -torch.log((-torch.log(u)).clamp_(min=1e-20))


def routed_head_ref(
    hidden: torch.Tensor,  # [B, H] last layer output (incl. residual), before the final norm
    norm_weight: torch.Tensor,  # [H]
    eps: float,
    lm_head: torch.Tensor,  # [V, H]
    router: Optional[Tuple[torch.Tensor, ...]],  # (w1 [R,H], b1 [R], w2 [R], b2 []) or None
    temperature: torch.Tensor,  # [B] float32, 0 = greedy
    seeds: torch.Tensor,  # [B] int64, per-row sampling seed for this step
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # token [B] int64, top_prob [B], score [B]
    h, _ = rms_norm_ref(hidden, norm_weight, eps)
    return head_from_logits(torch.nn.functional.linear(h, lm_head).float(), h, router, temperature, seeds)


def head_from_logits(
    logits: torch.Tensor,  # [B, V] float32
    h: torch.Tensor,  # [B, H] normed hidden state (router input)
    router: Optional[Tuple[torch.Tensor, ...]],
    temperature: torch.Tensor,  # [B] float32, 0 = greedy
    seeds: torch.Tensor,  # [B] int64
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The routed head's choices given full logits (what the reference does after lm_head)."""
    top_prob = torch.softmax(logits, dim=-1).amax(dim=-1)
    tokens = logits.argmax(dim=-1)
    for b in torch.nonzero(temperature > 0).flatten().tolist():
        noisy = logits[b] / temperature[b] + gumbel_noise(int(seeds[b]), logits.shape[1])
        tokens[b] = noisy.argmax()
    if router is None:
        score = torch.full_like(top_prob, float("nan"))
    else:
        score = router_mlp_ref(h, *router)
    return tokens, top_prob, score


# ---------------------------------------------------------------------------------------
# Triton kernels. Three launches, none of which materialises [B, V] logits:
#   1. _head_partial_kernel, grid (B, V_SPLITS): final RMSNorm of the row (recomputed per
#      program: H is small next to a vocab tile), then a GEMV over this program's vocab
#      range in [BLOCK_V, BLOCK_H] tiles, keeping the running argmax (strict '>' across
#      tiles: torch.argmax's lowest-index tie-break), the running max / sum-exp of the raw
#      logits (for the top probability) and, for temperature rows, the Gumbel-perturbed
#      argmax. Split 0 also writes the normed row for the router.
#   2. _router_partial_kernel, grid (B, R_SPLITS): relu(W1[rows] h + b1[rows]) . w2[rows].
#   3. _head_reduce_kernel, grid (B): merges the splits -> token, top_prob, router score.
# With V_SPLITS >= the SM count, a batch-1 call streams the lm_head with the whole GPU.
# ---------------------------------------------------------------------------------------
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _normed_chunk(hidden_ptr, norm_weight_ptr, row_off, h0, inv_rms, H, BLOCK_H: tl.constexpr):
    """Normed hidden values [BLOCK_H] at h0.., rounded like the reference (weight * x.to(dtype))."""
    offs = h0 + tl.arange(0, BLOCK_H)
    mask = offs < H
    x = tl.load(hidden_ptr + row_off + offs, mask=mask, other=0.0)
    dtype = x.dtype
    xn = (x.to(tl.float32) * inv_rms).to(dtype).to(tl.float32)
    w = tl.load(norm_weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return (w * xn).to(dtype).to(tl.float32), offs, mask


@triton.jit
def _head_partial_kernel(
    hidden_ptr,  # [B, H], row stride hidden_stride
    norm_weight_ptr,  # [H]
    lm_head_ptr,  # [V, H], row stride lm_stride
    temperature_ptr,  # [B] float32, 0 = greedy
    seeds_ptr,  # [B] int64
    h_normed_ptr,  # [B, H] float32 out (written by split 0)
    part_best_ptr,  # [B, V_SPLITS] float32 out: best choice score in this split
    part_idx_ptr,  # [B, V_SPLITS] int32 out: its token id
    part_max_ptr,  # [B, V_SPLITS] float32 out: max raw logit
    part_sum_ptr,  # [B, V_SPLITS] float32 out: sum exp(logit - max)
    hidden_stride,
    lm_stride,
    H,
    V,
    eps,
    V_PER_SPLIT,
    V_SPLITS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    row_off = b * hidden_stride
    ss = tl.zeros([BLOCK_H], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs = h0 + tl.arange(0, BLOCK_H)
        x = tl.load(hidden_ptr + row_off + offs, mask=offs < H, other=0.0).to(tl.float32)
        ss += x * x
    inv_rms = tl.rsqrt(tl.sum(ss, axis=0) / H + eps)
    if split == 0:
        for h0 in range(0, H, BLOCK_H):
            xn, offs, mask = _normed_chunk(hidden_ptr, norm_weight_ptr, row_off, h0, inv_rms, H, BLOCK_H)
            tl.store(h_normed_ptr + b * H + offs, xn, mask=mask)

    temp = tl.load(temperature_ptr + b)
    sampling = temp > 0
    inv_temp = 1.0 / tl.where(sampling, temp, 1.0)
    seed = tl.load(seeds_ptr + b)
    best = tl.full([], float("-inf"), tl.float32)
    best_idx = tl.full([], 0, tl.int32)
    run_max = tl.full([], float("-inf"), tl.float32)
    run_sum = tl.full([], 0.0, tl.float32)
    v_start = split * V_PER_SPLIT
    v_end = tl.minimum(v_start + V_PER_SPLIT, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        vo = v0 + tl.arange(0, BLOCK_V)
        vmask = vo < v_end
        acc = tl.zeros([BLOCK_V], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            xn, offs, mask = _normed_chunk(hidden_ptr, norm_weight_ptr, row_off, h0, inv_rms, H, BLOCK_H)
            w = tl.load(lm_head_ptr + vo[:, None].to(tl.int64) * lm_stride + offs[None, :],
                        mask=vmask[:, None] & mask[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(w * xn[None, :], axis=1)
        logits = tl.where(vmask, acc, -float("inf"))
        tile_max = tl.max(logits, axis=0)
        new_max = tl.maximum(run_max, tile_max)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(logits - new_max), axis=0)
        run_max = new_max
        u = tl.rand(seed, vo)
        gumbel = -tl.log(tl.maximum(-tl.log(tl.maximum(u, 1e-20)), 1e-20))
        score = tl.where(sampling, logits * inv_temp + gumbel, logits)
        score = tl.where(vmask, score, -float("inf"))
        tile_best = tl.max(score, axis=0)
        tile_idx = v0 + tl.argmax(score, axis=0)
        take = tile_best > best  # strict: an earlier tile keeps ties
        best_idx = tl.where(take, tile_idx, best_idx)
        best = tl.where(take, tile_best, best)
    out = b * V_SPLITS + split
    tl.store(part_best_ptr + out, best)
    tl.store(part_idx_ptr + out, best_idx)
    tl.store(part_max_ptr + out, run_max)
    tl.store(part_sum_ptr + out, run_sum)


@triton.jit
def _router_partial_kernel(
    h_normed_ptr,  # [B, H] float32
    w1_ptr,  # [R, H] float32
    b1_ptr,  # [R] float32
    w2_ptr,  # [R] float32
    part_ptr,  # [B, R_SPLITS] float32 out
    H,
    R,
    R_SPLITS,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    rs = tl.program_id(1)
    rows = rs * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    z = tl.zeros([BLOCK_R], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs = h0 + tl.arange(0, BLOCK_H)
        hmask = offs < H
        h = tl.load(h_normed_ptr + b * H + offs, mask=hmask, other=0.0)
        w = tl.load(w1_ptr + rows[:, None].to(tl.int64) * H + offs[None, :], mask=rmask[:, None] & hmask[None, :],
                    other=0.0)
        z += tl.sum(w * h[None, :], axis=1)
    z = tl.maximum(z + tl.load(b1_ptr + rows, mask=rmask, other=0.0), 0.0)
    part = tl.sum(z * tl.load(w2_ptr + rows, mask=rmask, other=0.0), axis=0)
    tl.store(part_ptr + b * R_SPLITS + rs, part)


@triton.jit
def _head_reduce_kernel(
    part_best_ptr,  # [B, V_SPLITS] float32
    part_idx_ptr,  # [B, V_SPLITS] int32
    part_max_ptr,  # [B, V_SPLITS] float32
    part_sum_ptr,  # [B, V_SPLITS] float32
    router_part_ptr,  # [B, R_SPLITS] float32 (unused without HAS_ROUTER)
    b2_ptr,  # [1] float32 (unused without HAS_ROUTER)
    token_ptr,  # [B] int64 out
    top_prob_ptr,  # [B] float32 out
    score_ptr,  # [B] float32 out (nan without HAS_ROUTER)
    V_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,  # next power of two >= V_SPLITS
    R_SPLITS: tl.constexpr,
    BLOCK_RS: tl.constexpr,  # next power of two >= R_SPLITS
    HAS_ROUTER: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    smask = s < V_SPLITS
    best = tl.load(part_best_ptr + b * V_SPLITS + s, mask=smask, other=-float("inf"))
    idx = tl.load(part_idx_ptr + b * V_SPLITS + s, mask=smask, other=0)
    win = tl.argmax(best, axis=0)  # splits are in vocab order: the first maximal split wins ties
    token = tl.sum(tl.where(s == win, idx, 0), axis=0)
    mx = tl.load(part_max_ptr + b * V_SPLITS + s, mask=smask, other=-float("inf"))
    se = tl.load(part_sum_ptr + b * V_SPLITS + s, mask=smask, other=0.0)
    m = tl.max(mx, axis=0)
    total = tl.sum(tl.where(smask, se * tl.exp(mx - m), 0.0), axis=0)
    tl.store(token_ptr + b, token.to(tl.int64))
    tl.store(top_prob_ptr + b, 1.0 / total)
    if HAS_ROUTER:
        r = tl.arange(0, BLOCK_RS)
        z = tl.sum(tl.load(router_part_ptr + b * R_SPLITS + r, mask=r < R_SPLITS, other=0.0), axis=0)
        z = z + tl.load(b2_ptr)
        tl.store(score_ptr + b, 1.0 / (1.0 + tl.exp(-z)))
    else:
        tl.store(score_ptr + b, float("nan"))


def routed_head_triton(hidden, norm_weight, eps, lm_head, router, temperature, seeds,
                       v_splits: Optional[int] = None):
    batch, hidden_size = hidden.shape
    vocab = lm_head.shape[0]
    dev = hidden.device
    if hidden.stride(-1) != 1 or lm_head.stride(-1) != 1:
        raise ValueError("routed_head needs unit stride along the hidden dim")
    block_v, block_h = 64, min(128, triton.next_power_of_2(hidden_size))
    if v_splits is None:
        v_splits = 132 if hidden.is_cuda else 4  # about one program per SM at batch 1
    v_per_split = triton.cdiv(triton.cdiv(vocab, v_splits), block_v) * block_v
    v_splits = triton.cdiv(vocab, v_per_split)
    f32 = dict(dtype=torch.float32, device=dev)
    h_normed = torch.empty((batch, hidden_size), **f32)
    part_best = torch.empty((batch, v_splits), **f32)
    part_idx = torch.empty((batch, v_splits), dtype=torch.int32, device=dev)
    part_max = torch.empty((batch, v_splits), **f32)
    part_sum = torch.empty((batch, v_splits), **f32)
    tokens = torch.empty(batch, dtype=torch.int64, device=dev)
    top_prob = torch.empty(batch, **f32)
    score = torch.empty(batch, **f32)
    if batch == 0:
        return tokens, top_prob, score
    _head_partial_kernel[(batch, v_splits)](
        hidden, norm_weight, lm_head, temperature, seeds, h_normed, part_best, part_idx, part_max, part_sum,
        hidden.stride(0), lm_head.stride(0), hidden_size, vocab, eps, v_per_split,
        V_SPLITS=v_splits, BLOCK_V=block_v, BLOCK_H=block_h,
    )
    r_splits, router_part, b2 = 1, part_sum, part_sum
    if router is not None:
        w1, b1, w2, b2 = router
        w1 = w1.contiguous()  # the kernel reads W1 as row-major [R, H]
        block_r = 64
        r_splits = triton.cdiv(w1.shape[0], block_r)
        router_part = torch.empty((batch, r_splits), **f32)
        _router_partial_kernel[(batch, r_splits)](
            h_normed, w1, b1, w2, router_part, hidden_size, w1.shape[0], r_splits,
            BLOCK_R=block_r, BLOCK_H=block_h,
        )
        b2 = b2.reshape(1)
    _head_reduce_kernel[(batch,)](
        part_best, part_idx, part_max, part_sum, router_part, b2, tokens, top_prob, score,
        V_SPLITS=v_splits, BLOCK_S=triton.next_power_of_2(v_splits), R_SPLITS=r_splits,
        BLOCK_RS=triton.next_power_of_2(r_splits), HAS_ROUTER=router is not None,
    )
    return tokens, top_prob, score
