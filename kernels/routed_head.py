"""Routed head: final RMSNorm + lm_head + argmax/sample + the router MLP in one pass.

Returns, per row, the SLM's token, the SLM's top probability (softmax of the raw
logits, the "confidence" baseline's signal) and the router score on the normed hidden
state h (the folded CITER router; see citer.router):

  hidden-only router (the paper's): p = sigmoid(relu(h @ W1.T + b1) @ w2 + b2)
  head-signal router:               p = sigmoid(relu(h @ W1.T + s @ Ws.T + b1) @ w2 + b2 + s @ c)

where s = (logit of the top probability, top-1 minus top-2 logit, entropy) are the head's
signals of the raw logits (head_signals_ref), computed in the same online pass over the
vocabulary that finds the token. The Triton kernel never materialises [B, vocab]
logits; this reference does, and is what runs on CPU.

Sampling rows (temperature >= MIN_TEMPERATURE; under it a row is greedy) use the Gumbel-max trick: token = argmax(logits / T + G),
G ~ Gumbel(0, 1), drawn here from a torch.Generator seeded with seeds[b] (the Triton
kernel draws G from Philox with the same seed, so the two agree in distribution, not
sample for sample).
"""
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from .rmsnorm import _num_warps, _rms_norm_kernel, rms_norm_ref
from .sampling import MIN_TEMPERATURE, choose_tokens
from .triton_utils import dot_fp32, sm_count

BLOCK_V = 64  # vocab rows per tile
ROUTER_BLOCK = 64  # router hidden units per tile
REDUCE_BLOCK_R = 128  # router hidden units per chunk in the reduce kernel


NUM_SIGNALS = 3  # (logit of top probability, top-1 minus top-2 logit, entropy)
MIN_REST = 1e-6  # 1 - top probability is floored here: logit(top prob) <= -log(MIN_REST) = 13.8


class RouterParams(NamedTuple):
    """A folded router (citer.router.FoldedRouter.params), float32."""

    w1: torch.Tensor  # [R, H] first layer, hidden-state part
    b1: torch.Tensor  # [R]
    w2: torch.Tensor  # [R]
    b2: torch.Tensor  # []
    w_sig: Optional[torch.Tensor] = None  # [R, NUM_SIGNALS] first layer, head-signal part (None: hidden-only)
    c_sig: Optional[torch.Tensor] = None  # [NUM_SIGNALS] the signals' direct (skip) weights

    @property
    def head_signals(self) -> bool:
        """Does this router read the head's signals (so it cannot score a row before the lm_head)?"""
        return self.w_sig is not None


def head_signals_ref(logits: torch.Tensor) -> torch.Tensor:  # [B, V] raw logits -> [B, NUM_SIGNALS] float32
    """Per row: log(p / (1 - p)) of the top probability p (1 - p floored at MIN_REST),
    the top-1 minus top-2 logit, and the entropy of softmax(logits), all in float32."""
    x = logits.float()
    top2 = x.topk(2, dim=-1).values if x.shape[-1] > 1 else torch.cat([x, torch.full_like(x, float("-inf"))], -1)
    z = x - top2[:, :1]
    e = torch.exp(z)
    total = e.sum(-1)
    rest = (total - 1.0).clamp_min(MIN_REST)  # the sum over every token but the top one, / its exp
    entropy = torch.log(total) - (e * z.clamp_min(-1e30)).sum(-1) / total
    return torch.stack([-torch.log(rest), top2[:, 0] - top2[:, 1], entropy], dim=-1)


def router_mlp_ref(
    h: torch.Tensor,  # [B, H] normed hidden state
    router: RouterParams,
    signals: Optional[torch.Tensor] = None,  # [B, NUM_SIGNALS] with a head-signal router
) -> torch.Tensor:  # [B] float32 in (0, 1)
    router = RouterParams(*router)
    w1, b1, w2, b2 = router[:4]
    z = torch.addmm(b1, h.float(), w1.t())  # params are float32 (FoldedRouter.to)
    if router.head_signals:
        if signals is None:
            raise ValueError("a head-signal router needs the head's signals (the lm_head must run first)")
        z = z.addmm_(signals, router.w_sig.t())
    out = torch.mv(z.relu_(), w2).add_(b2)
    if router.head_signals:
        out = out.add_(signals @ router.c_sig)
    return torch.sigmoid(out)


def routed_head_ref(
    hidden: torch.Tensor,  # [B, H] last layer output (incl. residual), before the final norm
    norm_weight: torch.Tensor,  # [H]
    eps: float,
    lm_head: torch.Tensor,  # [V, H]
    router: Optional[RouterParams],
    temperature: torch.Tensor,  # [B] float32, under MIN_TEMPERATURE = greedy
    seeds: torch.Tensor,  # [B] int64, per-row sampling seed for this step
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # token [B] int64, top_prob [B], score [B]
    h, _ = rms_norm_ref(hidden, norm_weight, eps)
    logits = torch.nn.functional.linear(h, lm_head).float()
    tokens, top_prob = choose_tokens(logits, temperature, seeds)
    return tokens, top_prob, router_scores_ref(h, router, top_prob, logits)


def router_scores_ref(h: torch.Tensor, router: Optional[RouterParams], like: torch.Tensor,
                      logits: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The router's score per row of the normed h (a head-signal router reads the raw
    logits [B, V]), or NaN per row without a router."""
    if router is None:
        return torch.full_like(like, float("nan"))
    router = RouterParams(*router)
    signals = head_signals_ref(logits) if router.head_signals else None
    return router_mlp_ref(h, router, signals)


# ---------------------------------------------------------------------------------------
# Triton kernels. Three launches; none materialises [B, V] logits:
#   1. the RMSNorm kernel (rmsnorm.py) -> the normed rows h [B, H] in the hidden dtype,
#      rounded exactly like the reference (weight * x.to(dtype)).
#   2. _head_partial_kernel, grid (V_SPLITS, cdiv(B, BLOCK_B)): program (s, bb) owns the
#      vocab range of split s and a tile of BLOCK_B rows. Each [BLOCK_V, BLOCK_H] lm_head
#      tile is loaded once for all BLOCK_B rows and multiplied with tl.dot (fp32
#      accumulation); per row it keeps the running argmax (strict '>' across tiles, and
#      tl.argmax's first index within a tile: torch.argmax's lowest-index tie-break), the
#      running top-2 of the raw logits, sum exp(l - max) and sum exp(l - max) * (l - max)
#      (online logsumexp and entropy, rescaled whenever the max moves) and, for rows with
#      temperature >= MIN_TEMPERATURE, the Gumbel-max choice argmax(logit / T + G) with
#      G = -log(-log(U)), U = tl.rand(seed_b, token_id): the noise depends only on the
#      row's seed and the token id, not on the batch or the split layout. With a router,
#      the same program also takes its share (split s) of the router's R hidden units, so
#      the router streams with the whole GPU too: a hidden-only router's
#      sum_r relu(h . W1[r] + b1[r]) * w2[r]; a head-signal router's pre-activations
#      h . W1[r] (the signals are known only after the vocabulary is merged).
#   3. _head_reduce_kernel, grid (B): merges the splits -> token, top_prob, the head's
#      signals and the router score (a head-signal router's ReLU layer is finished here:
#      R units per row, a few KB).
# V_SPLITS defaults to about four programs per SM: a batch-1 call streams the lm_head with
# the whole GPU, and a batch of up to 64 rows reads every lm_head byte once.
# ---------------------------------------------------------------------------------------
@triton.jit
def _head_partial_kernel(
    h_ptr,  # [B, H] normed hidden rows, contiguous (hidden dtype)
    lm_head_ptr,  # [V, H], row stride lm_stride, unit stride along H
    temperature_ptr,  # [B] float32, under MIN_TEMPERATURE = greedy
    seeds_ptr,  # [B] int64
    w1_ptr,  # [R, H] float32 contiguous (unused without a router)
    b1_ptr,  # [R] float32 (unused without a hidden-only router)
    w2_ptr,  # [R] float32 (unused without a hidden-only router)
    part_best_ptr,  # [B, V_SPLITS] float32 out: best choice score in this split
    part_idx_ptr,  # [B, V_SPLITS] int32 out: its token id
    part_max_ptr,  # [B, V_SPLITS] float32 out: max raw logit
    part_max2_ptr,  # [B, V_SPLITS] float32 out: second largest raw logit (-inf if the split has one token)
    part_sum_ptr,  # [B, V_SPLITS] float32 out: sum exp(logit - max)
    part_ent_ptr,  # [B, V_SPLITS] float32 out: sum exp(logit - max) * (logit - max)
    part_router_ptr,  # [B, V_SPLITS] float32 out: this split's share of relu(W1 h + b1) . w2 (hidden-only)
    part_z_ptr,  # [B, R] float32 out: h . W1[r] for this split's units r (head-signal router)
    B,
    H,
    V,
    R,
    lm_stride,
    V_PER_SPLIT,  # multiple of BLOCK_V
    R_PER_SPLIT,  # multiple of BLOCK_R
    V_SPLITS: tl.constexpr,
    BLOCK_B: tl.constexpr,  # rows per program, >= 16 (the dot's M)
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,  # hidden chunk (the dot's K), >= 16
    BLOCK_R: tl.constexpr,
    HAS_ROUTER: tl.constexpr,
    HEAD_SIGNALS: tl.constexpr,  # the router reads the head's signals: store pre-activations
    DOT_FP32: tl.constexpr,
    MIN_TEMPERATURE: tl.constexpr,
):
    split = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    rows64 = rows.to(tl.int64)
    temp = tl.load(temperature_ptr + rows, mask=rmask, other=0.0)
    sampling = temp >= MIN_TEMPERATURE  # under it a row is greedy: logits / T would overflow
    any_sampling = tl.max(sampling.to(tl.int32), axis=0) > 0
    inv_temp = 1.0 / tl.where(sampling, temp, 1.0)
    seed = tl.load(seeds_ptr + rows, mask=rmask, other=0).to(tl.int64)

    best = tl.full([BLOCK_B], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_B], tl.int32)
    run_max = tl.full([BLOCK_B], float("-inf"), tl.float32)
    run_max2 = tl.full([BLOCK_B], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_B], tl.float32)
    run_ent = tl.zeros([BLOCK_B], tl.float32)
    v_start = split * V_PER_SPLIT
    v_end = tl.minimum(v_start + V_PER_SPLIT, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        vo = v0 + tl.arange(0, BLOCK_V)
        vmask = vo < v_end
        acc = tl.zeros([BLOCK_B, BLOCK_V], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            offs = h0 + tl.arange(0, BLOCK_H)
            hmask = offs < H
            x = tl.load(h_ptr + rows64[:, None] * H + offs[None, :], mask=rmask[:, None] & hmask[None, :],
                        other=0.0)
            w = tl.load(lm_head_ptr + vo[:, None].to(tl.int64) * lm_stride + offs[None, :],
                        mask=vmask[:, None] & hmask[None, :], other=0.0)
            if DOT_FP32:
                acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
        logits = tl.where(vmask[None, :], acc, float("-inf"))
        tile_max = tl.max(logits, axis=1)
        tile_arg = tl.argmax(logits, axis=1)
        # the tile's second largest: its max with one (the first) maximal entry masked
        tile_max2 = tl.max(tl.where(tl.arange(0, BLOCK_V)[None, :] == tile_arg[:, None], float("-inf"), logits),
                           axis=1)
        new_max = tl.maximum(run_max, tile_max)
        run_max2 = tl.maximum(tl.maximum(run_max2, tile_max2), tl.minimum(run_max, tile_max))
        # rescale the running sums to the new max: sum e^(l-m') = e^(m-m') sum e^(l-m) and
        # sum e^(l-m')(l-m') = e^(m-m') (sum e^(l-m)(l-m) + (m-m') sum e^(l-m))
        alpha = tl.exp(run_max - new_max)
        shift = tl.where(run_sum > 0, run_max - new_max, 0.0)  # no -inf * 0 before the first tile
        zt = tl.where(vmask[None, :], logits - new_max[:, None], 0.0)
        et = tl.where(vmask[None, :], tl.exp(zt), 0.0)
        run_ent = alpha * (run_ent + shift * run_sum) + tl.sum(et * zt, axis=1)
        run_sum = run_sum * alpha + tl.sum(et, axis=1)
        run_max = new_max
        score = logits
        if any_sampling:
            seed2 = seed[:, None] + tl.zeros([BLOCK_B, BLOCK_V], dtype=tl.int64)
            vo2 = vo[None, :] + tl.zeros([BLOCK_B, BLOCK_V], dtype=tl.int32)
            u = tl.rand(seed2, vo2)
            gumbel = -tl.log(tl.maximum(-tl.log(tl.maximum(u, 1e-20)), 1e-20))
            score = tl.where(sampling[:, None] & vmask[None, :], logits * inv_temp[:, None] + gumbel, logits)
        tile_best = tl.max(score, axis=1)
        tile_idx = v0 + tl.argmax(score, axis=1)
        take = tile_best > best  # strict: an earlier tile keeps ties
        best_idx = tl.where(take, tile_idx, best_idx)
        best = tl.where(take, tile_best, best)
    out = rows64 * V_SPLITS + split
    tl.store(part_best_ptr + out, best, mask=rmask)
    tl.store(part_idx_ptr + out, best_idx, mask=rmask)
    tl.store(part_max_ptr + out, run_max, mask=rmask)
    tl.store(part_max2_ptr + out, run_max2, mask=rmask)
    tl.store(part_sum_ptr + out, run_sum, mask=rmask)
    tl.store(part_ent_ptr + out, run_ent, mask=rmask)

    if HAS_ROUTER:
        zsum = tl.zeros([BLOCK_B], tl.float32)
        r_start = split * R_PER_SPLIT
        r_end = tl.minimum(r_start + R_PER_SPLIT, R)
        for r0 in range(r_start, r_end, BLOCK_R):
            ro = r0 + tl.arange(0, BLOCK_R)
            romask = ro < r_end
            z = tl.zeros([BLOCK_B, BLOCK_R], dtype=tl.float32)
            for h0 in range(0, H, BLOCK_H):
                offs = h0 + tl.arange(0, BLOCK_H)
                hmask = offs < H
                x = tl.load(h_ptr + rows64[:, None] * H + offs[None, :], mask=rmask[:, None] & hmask[None, :],
                            other=0.0).to(tl.float32)
                w = tl.load(w1_ptr + ro[:, None].to(tl.int64) * H + offs[None, :],
                            mask=romask[:, None] & hmask[None, :], other=0.0)
                z += tl.dot(x, tl.trans(w), input_precision="ieee")
            if HEAD_SIGNALS:
                tl.store(part_z_ptr + rows64[:, None] * R + ro[None, :], z, mask=rmask[:, None] & romask[None, :])
            else:
                z = tl.maximum(z + tl.load(b1_ptr + ro, mask=romask, other=0.0)[None, :], 0.0)
                zsum += tl.sum(z * tl.load(w2_ptr + ro, mask=romask, other=0.0)[None, :], axis=1)
        if not HEAD_SIGNALS:
            tl.store(part_router_ptr + out, zsum, mask=rmask)


@triton.jit
def _head_reduce_kernel(
    part_best_ptr,  # [B, V_SPLITS] float32
    part_idx_ptr,  # [B, V_SPLITS] int32
    part_max_ptr,  # [B, V_SPLITS] float32
    part_max2_ptr,  # [B, V_SPLITS] float32
    part_sum_ptr,  # [B, V_SPLITS] float32
    part_ent_ptr,  # [B, V_SPLITS] float32
    part_router_ptr,  # [B, V_SPLITS] float32 (hidden-only router)
    part_z_ptr,  # [B, R] float32 (head-signal router): h . W1[r]
    b1_ptr,  # [R] float32 (head-signal router)
    w2_ptr,  # [R] float32 (head-signal router)
    w_sig_ptr,  # [R, NUM_SIG] float32 contiguous (head-signal router)
    c_sig_ptr,  # [NUM_SIG] float32 (head-signal router)
    b2_ptr,  # [1] float32 (unused without a router)
    token_ptr,  # [B] int64 out
    top_prob_ptr,  # [B] float32 out
    score_ptr,  # [B] float32 out (nan without a router)
    signals_ptr,  # [B, NUM_SIG] float32 out: logit(top prob), top-1 - top-2 logit, entropy
    R,
    V_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,  # next power of two >= V_SPLITS
    BLOCK_R: tl.constexpr,
    NUM_SIG: tl.constexpr,  # == NUM_SIGNALS == 3
    MIN_REST: tl.constexpr,
    HAS_ROUTER: tl.constexpr,
    HEAD_SIGNALS: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    smask = s < V_SPLITS
    best = tl.load(part_best_ptr + b * V_SPLITS + s, mask=smask, other=float("-inf"))
    idx = tl.load(part_idx_ptr + b * V_SPLITS + s, mask=smask, other=0)
    win = tl.argmax(best, axis=0)  # splits are in vocab order: the first maximal split wins ties
    token = tl.sum(tl.where(s == win, idx, 0), axis=0)
    mx = tl.load(part_max_ptr + b * V_SPLITS + s, mask=smask, other=float("-inf"))
    mx2 = tl.load(part_max2_ptr + b * V_SPLITS + s, mask=smask, other=float("-inf"))
    se = tl.load(part_sum_ptr + b * V_SPLITS + s, mask=smask, other=0.0)
    ent = tl.load(part_ent_ptr + b * V_SPLITS + s, mask=smask, other=0.0)
    m = tl.max(mx, axis=0)
    scale = tl.where(smask, tl.exp(mx - m), 0.0)
    total = tl.sum(se * scale, axis=0)
    # sum e^(l-m)(l-m) over the splits (each split's sums are relative to its own max)
    ent_total = tl.sum(scale * (ent + tl.where(smask, mx - m, 0.0) * se), axis=0)
    top_split = tl.argmax(mx, axis=0)
    second = tl.maximum(tl.max(mx2, axis=0), tl.max(tl.where(s == top_split, float("-inf"), mx), axis=0))
    sig_logit = -tl.log(tl.maximum(total - 1.0, MIN_REST))
    sig_margin = m - second
    sig_entropy = tl.log(total) - ent_total / total
    tl.store(token_ptr + b, token.to(tl.int64))
    tl.store(top_prob_ptr + b, 1.0 / total)
    tl.store(signals_ptr + b * NUM_SIG + 0, sig_logit)
    tl.store(signals_ptr + b * NUM_SIG + 1, sig_margin)
    tl.store(signals_ptr + b * NUM_SIG + 2, sig_entropy)
    if HAS_ROUTER:
        if HEAD_SIGNALS:
            zsum = 0.0
            for r0 in range(0, R, BLOCK_R):
                ro = r0 + tl.arange(0, BLOCK_R)
                romask = ro < R
                z = tl.load(part_z_ptr + b * R + ro, mask=romask, other=0.0)
                z += tl.load(b1_ptr + ro, mask=romask, other=0.0)
                z += tl.load(w_sig_ptr + ro * NUM_SIG + 0, mask=romask, other=0.0) * sig_logit
                z += tl.load(w_sig_ptr + ro * NUM_SIG + 1, mask=romask, other=0.0) * sig_margin
                z += tl.load(w_sig_ptr + ro * NUM_SIG + 2, mask=romask, other=0.0) * sig_entropy
                zsum += tl.sum(tl.maximum(z, 0.0) * tl.load(w2_ptr + ro, mask=romask, other=0.0), axis=0)
            zsum += (tl.load(c_sig_ptr + 0) * sig_logit + tl.load(c_sig_ptr + 1) * sig_margin
                     + tl.load(c_sig_ptr + 2) * sig_entropy)
        else:
            zsum = tl.sum(tl.load(part_router_ptr + b * V_SPLITS + s, mask=smask, other=0.0), axis=0)
        z = zsum + tl.load(b2_ptr)
        tl.store(score_ptr + b, 1.0 / (1.0 + tl.exp(-z)))
    else:
        tl.store(score_ptr + b, float("nan"))


def _default_v_splits(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # under the interpreter few programs are fastest
    return 4 * sm_count(device)


def routed_head_triton(hidden, norm_weight, eps, lm_head, router, temperature, seeds,
                       v_splits: Optional[int] = None, return_signals: bool = False):
    """Same contract as routed_head_ref. hidden [B, H] and lm_head [V, H] with unit stride
    along H (an lm_head row slice is fine), norm_weight in the hidden dtype, lm_head in
    the hidden dtype; router params float32 (copied once per call otherwise); temperature
    [B] float32 and seeds [B] int64 on the same device. No host synchronisation.
    return_signals: also the head's signals [B, NUM_SIGNALS] (as head_signals_ref)."""
    batch, hidden_size = hidden.shape
    vocab = lm_head.shape[0]
    dev = hidden.device
    if hidden.stride(-1) != 1 or lm_head.stride(-1) != 1:
        raise ValueError("routed_head needs unit stride along the hidden dim")
    if lm_head.shape[1] != hidden_size:
        raise ValueError(f"lm_head {tuple(lm_head.shape)} does not match hidden size {hidden_size}")
    f32 = dict(dtype=torch.float32, device=dev)
    tokens = torch.empty(batch, dtype=torch.int64, device=dev)
    top_prob = torch.empty(batch, **f32)
    score = torch.empty(batch, **f32)
    if batch == 0:
        return (tokens, top_prob, score, torch.empty((0, NUM_SIGNALS), **f32)) if return_signals \
            else (tokens, top_prob, score)

    # 1. final RMSNorm -> h [B, H] in the hidden dtype (the reference's rounding)
    h = torch.empty((batch, hidden_size), dtype=hidden.dtype, device=dev)
    _rms_norm_kernel[(batch,)](
        hidden, hidden, h, h, norm_weight, hidden.stride(0), 0, hidden_size, eps,
        HAS_RESIDUAL=False, BLOCK=triton.next_power_of_2(hidden_size), num_warps=_num_warps(hidden_size),
    )

    # 2. vocab (and router) splits x row tiles
    if v_splits is None:
        v_splits = _default_v_splits(dev)
    v_per_split = triton.cdiv(triton.cdiv(vocab, v_splits), BLOCK_V) * BLOCK_V
    v_splits = triton.cdiv(vocab, v_per_split)  # every split non-empty
    # 16 rows (the dot's minimum M) up to batch 16, else 64 rows on 8 warps: no register
    # spills on sm_90 either way (checked with ptxas)
    block_b, num_warps = (16, 4) if batch <= 16 else (64, 8)
    block_h = min(128, max(16, triton.next_power_of_2(hidden_size)))
    part_best = torch.empty((batch, v_splits), **f32)
    part_idx = torch.empty((batch, v_splits), dtype=torch.int32, device=dev)
    part_max, part_max2, part_sum, part_ent = (torch.empty((batch, v_splits), **f32) for _ in range(4))
    signals = torch.empty((batch, NUM_SIGNALS), **f32)
    head_signals = router is not None and RouterParams(*router).head_signals
    if router is not None:
        router = RouterParams(*(t.to(torch.float32) if t is not None else None for t in router))
        w1 = router.w1.contiguous()  # the kernel reads W1 as row-major [R, H]
        b1, w2, b2 = router.b1, router.w2, router.b2.reshape(1)
        num_r = w1.shape[0]
        r_per_split = triton.cdiv(triton.cdiv(num_r, v_splits), ROUTER_BLOCK) * ROUTER_BLOCK
        part_router = torch.empty((batch, v_splits), **f32)
        if head_signals:
            part_z = torch.empty((batch, num_r), **f32)
            w_sig, c_sig = router.w_sig.contiguous(), router.c_sig.contiguous()
        else:
            part_z = w_sig = c_sig = part_router  # placeholders, never read
    else:
        w1 = b1 = w2 = b2 = part_router = part_z = w_sig = c_sig = part_sum  # placeholders, never read
        num_r, r_per_split = 0, ROUTER_BLOCK
    _head_partial_kernel[(v_splits, triton.cdiv(batch, block_b))](
        h, lm_head, temperature, seeds, w1, b1, w2, part_best, part_idx, part_max, part_max2, part_sum, part_ent,
        part_router, part_z, batch, hidden_size, vocab, num_r, lm_head.stride(0), v_per_split, r_per_split,
        V_SPLITS=v_splits, BLOCK_B=block_b, BLOCK_V=BLOCK_V, BLOCK_H=block_h, BLOCK_R=ROUTER_BLOCK,
        HAS_ROUTER=router is not None, HEAD_SIGNALS=head_signals, DOT_FP32=dot_fp32(lm_head.dtype),
        MIN_TEMPERATURE=MIN_TEMPERATURE, num_warps=num_warps,
    )

    # 3. merge the splits (and finish a head-signal router)
    _head_reduce_kernel[(batch,)](
        part_best, part_idx, part_max, part_max2, part_sum, part_ent, part_router, part_z, b1, w2, w_sig, c_sig, b2,
        tokens, top_prob, score, signals, num_r,
        V_SPLITS=v_splits, BLOCK_S=triton.next_power_of_2(v_splits), BLOCK_R=REDUCE_BLOCK_R, NUM_SIG=NUM_SIGNALS,
        MIN_REST=MIN_REST, HAS_ROUTER=router is not None, HEAD_SIGNALS=head_signals,
    )
    if return_signals:
        return tokens, top_prob, score, signals
    return tokens, top_prob, score
