"""Routed head: final RMSNorm + lm_head + argmax/sample + the router MLP in one pass.

Returns, per row, the SLM's token, the SLM's top probability (softmax of the raw
logits, the "confidence" baseline's signal) and the router score on the normed hidden
state h (the folded CITER router; see citer.engine.models.router):

  hidden-only router (the paper's): p = sigmoid(relu(h @ W1.T + b1) @ w2 + b2)
  head-signal router:               p = sigmoid(relu(h @ W1.T + s @ Ws.T + b1) @ w2 + b2 + s @ c)

where s = (logit of the top probability, top-1 minus top-2 logit, entropy) are the head's
signals of the raw logits (head_signals_ref), computed in the same online pass over the
vocabulary that finds the token. The Triton kernel never materialises [B, vocab]
logits (its kernels are in routed_head_kernels.py); this reference does, and is what
runs on CPU.

Sampling rows (temperature >= MIN_TEMPERATURE; under it a row is greedy) use the
Gumbel-max trick: token = argmax(logits / T + G), G ~ Gumbel(0, 1), drawn here from a torch.Generator seeded with seeds[b] (the Triton
kernel draws G from Philox with the same seed, so the two agree in distribution, not
sample for sample).
"""
from typing import Optional, Tuple

import torch
import triton

from . import cpu_ext
from .linear import FAST_ROWS, linear_cpu, linear_ref
from .rmsnorm import _num_warps, _rms_norm_kernel, rms_norm_cpu, rms_norm_fits, rms_norm_ref
from .sampling import MIN_TEMPERATURE, choose_tokens, head_stats
from .routed_head_kernels import _head_partial_kernel, _head_reduce_kernel
from .triton_utils import dot_fp32, sm_count

BLOCK_V = 64  # vocab rows per tile
ROUTER_BLOCK = 64  # router hidden units per tile
REDUCE_BLOCK_R = 128  # router hidden units per chunk in the reduce kernel


NUM_SIGNALS = 3  # (logit of top probability, top-1 minus top-2 logit, entropy)
MIN_REST = 1e-6  # 1 - top probability is floored here: logit(top prob) <= -log(MIN_REST) = 13.8


# A folded router, as these ops take it: a tuple of float32 tensors (w1 may be float16: a hidden-only
# router shipped in float16 keeps it on CPU, see FoldedRouter.to)
#   (w1 [R, H], b1 [R], w2 [R], b2 [], w_sig [R, NUM_SIGNALS] or None, c_sig [NUM_SIGNALS] or None)
# (citer.engine.models.router.RouterParams is such a tuple); w_sig is None for a hidden-only router.
RouterWeights = Tuple[Optional[torch.Tensor], ...]


def _unpack(router: RouterWeights):
    """-> (w1, b1, w2, b2, w_sig, c_sig); w_sig / c_sig None for a hidden-only router."""
    w1, b1, w2, b2, *sig = router
    w_sig, c_sig = (tuple(sig) + (None, None))[:2]
    return w1, b1, w2, b2, w_sig, c_sig


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


def head_signals_cpu(logits: torch.Tensor,  # [B, V] raw logits
                     stats: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,  # head_stats(logits), if computed
                     ) -> torch.Tensor:  # [B, NUM_SIGNALS] float32
    """head_signals_ref's values from the CPU kernel's statistics (head_stats), the reference
    where the kernel does not apply. The kernel sums the rest of the distribution without the
    top token's 1, so -log(rest) keeps its precision on confident steps, where the
    reference's total - 1 cancels (there the two differ by the reference's rounding)."""
    stats = stats if stats is not None else head_stats(logits)
    if stats is None:
        return head_signals_ref(logits)
    top1, top2, rest, ez = stats[1].unbind(-1)
    total = 1.0 + rest
    return torch.stack([-torch.log(rest.clamp_min(MIN_REST)), top1 - top2, torch.log(total) - ez / total], dim=-1)


def router_mlp_ref(
    h: torch.Tensor,  # [B, H] normed hidden state
    router: RouterWeights,
    signals: Optional[torch.Tensor] = None,  # [B, NUM_SIGNALS] with a head-signal router
) -> torch.Tensor:  # [B] float32 in (0, 1)
    w1, b1, w2, b2, w_sig, c_sig = _unpack(router)
    w1 = w1.float() if w1.dtype == torch.float16 else w1  # float32, or float16 as shipped (FoldedRouter.to)
    z = linear_cpu(h.float(), w1, None, b1)  # few rows: one pass over W1
    if w_sig is not None:
        if signals is None:
            raise ValueError("a head-signal router needs the head's signals (the lm_head must run first)")
        z = z.addmm_(signals, w_sig.t())
    out = torch.mv(z.relu_(), w2).add_(b2)
    if w_sig is not None:
        out = out.add_(signals @ c_sig)
    return torch.sigmoid(out)


def router_mlp_cpu(
    h: torch.Tensor,  # [B, H] normed hidden state; with norm, the hidden state before the final norm
    router: RouterWeights,
    signals: Optional[torch.Tensor] = None,  # [B, NUM_SIGNALS] with a head-signal router
    norm: Optional[Tuple[torch.Tensor, float]] = None,  # (weight [H], eps) of the final RMSNorm to apply first
) -> torch.Tensor:  # [B] float32 in (0, 1)
    """router_mlp_ref's contract (on rms_norm_cpu(h, *norm) with a norm); a hidden-only router
    over the few rows of a CPU decode step in one call of the AVX-512 kernel
    (csrc/cpu_router.inc: the norm too, by rms_norm_cpu's kernel), the rest on the reference."""
    w1, b1, w2, b2, w_sig, _ = _unpack(router)
    kernel = (w_sig is None and 0 < h.shape[0] <= FAST_ROWS and h.device.type == "cpu" and w1.is_contiguous()
              and w1.dtype in (torch.float32, torch.float16))
    if norm is not None:
        if kernel and rms_norm_fits(h, norm[0]):
            return cpu_ext.ext.router_mlp(h, w1, b1, w2, b2, norm[0], float(norm[1]))
        h = rms_norm_cpu(h, norm[0], norm[1])[0]  # e.g. float16 rows: the norm on its own, the MLP as without it
    if kernel:
        return cpu_ext.ext.router_mlp(h, w1, b1, w2, b2)
    return router_mlp_ref(h, router, signals)


def routed_head_ref(
    hidden: torch.Tensor,  # [B, H] last layer output (incl. residual), before the final norm
    norm_weight: torch.Tensor,  # [H]
    eps: float,
    lm_head: torch.Tensor,  # [V, H]
    router: Optional[RouterWeights],
    temperature: torch.Tensor,  # [B] float32, under MIN_TEMPERATURE = greedy
    seeds: torch.Tensor,  # [B] int64, per-row sampling seed for this step
    lm_scale: Optional[torch.Tensor] = None,  # [V] float32 with an int8 lm_head
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # token [B] int64, top_prob [B], score [B]
    h, _ = rms_norm_ref(hidden, norm_weight, eps)
    logits = linear_ref(h, lm_head, lm_scale).float()
    stats = head_stats(logits)  # one pass for the token choice and the head signals
    tokens, top_prob = choose_tokens(logits, temperature, seeds, stats=stats)
    return tokens, top_prob, router_scores_ref(h, router, top_prob, logits, stats)


def router_scores_ref(h: torch.Tensor, router: Optional[RouterWeights], like: torch.Tensor,
                      logits: Optional[torch.Tensor] = None,
                      stats: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """The router's score per row of the normed h (a head-signal router reads the raw
    logits [B, V], or their head_stats where the caller has them), or NaN per row without
    a router."""
    if router is None:
        return torch.full_like(like, float("nan"))
    signals = head_signals_cpu(logits, stats) if _unpack(router)[4] is not None else None
    return router_mlp_cpu(h, router, signals)


def _default_v_splits(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # under the interpreter few programs are fastest
    return 4 * sm_count(device)


def routed_head_triton(hidden, norm_weight, eps, lm_head, router, temperature, seeds, lm_scale=None,
                       v_splits: Optional[int] = None, return_signals: bool = False):
    """Same contract as routed_head_ref. hidden [B, H] and lm_head [V, H] with unit stride
    along H (an lm_head row slice is fine), norm_weight in the hidden dtype, lm_head in
    the hidden dtype or int8 with lm_scale [V] float32 (an int8 lm_head's logits differ
    from the reference's by its rounding of the dequantized weights to the hidden dtype);
    router params float32 (copied once per call otherwise); temperature
    [B] float32 and seeds [B] int64 on the same device. No host synchronisation.
    return_signals: also the head's signals [B, NUM_SIGNALS] (as head_signals_ref)."""
    batch, hidden_size = hidden.shape
    vocab = lm_head.shape[0]
    dev = hidden.device
    if hidden.stride(-1) != 1 or lm_head.stride(-1) != 1:
        raise ValueError("routed_head needs unit stride along the hidden dim")
    if lm_head.shape[1] != hidden_size:
        raise ValueError(f"lm_head {tuple(lm_head.shape)} does not match hidden size {hidden_size}")
    lm_int8 = lm_head.dtype == torch.int8
    if lm_int8 and (lm_scale is None or lm_scale.shape != (vocab,) or lm_scale.dtype != torch.float32
                    or lm_scale.device != dev or lm_scale.stride(0) != 1):
        raise ValueError(f"an int8 lm_head needs float32 scales [{vocab}], contiguous, on {dev}")
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
    head_signals = router is not None and _unpack(router)[4] is not None
    if router is not None:
        w1, b1, w2, b2, w_sig, c_sig = (t.to(torch.float32) if t is not None else None for t in _unpack(router))
        w1 = w1.contiguous()  # the kernel reads W1 as row-major [R, H]
        b2 = b2.reshape(1)
        num_r = w1.shape[0]
        r_per_split = triton.cdiv(triton.cdiv(num_r, v_splits), ROUTER_BLOCK) * ROUTER_BLOCK
        part_router = torch.empty((batch, v_splits), **f32)
        if head_signals:
            part_z = torch.empty((batch, num_r), **f32)
            w_sig, c_sig = w_sig.contiguous(), c_sig.contiguous()
        else:
            part_z = w_sig = c_sig = part_router  # placeholders, never read
    else:
        w1 = b1 = w2 = b2 = part_router = part_z = w_sig = c_sig = part_sum  # placeholders, never read
        num_r, r_per_split = 0, ROUTER_BLOCK
    scales = lm_scale if lm_int8 else part_sum  # placeholder without LM_INT8, never read
    _head_partial_kernel[(v_splits, triton.cdiv(batch, block_b))](
        h, lm_head, scales, temperature, seeds, w1, b1, w2, part_best, part_idx, part_max, part_max2, part_sum,
        part_ent, part_router, part_z, batch, hidden_size, vocab, num_r, lm_head.stride(0), v_per_split, r_per_split,
        V_SPLITS=v_splits, BLOCK_B=block_b, BLOCK_V=BLOCK_V, BLOCK_H=block_h, BLOCK_R=ROUTER_BLOCK,
        HAS_ROUTER=router is not None, HEAD_SIGNALS=head_signals, DOT_FP32=dot_fp32(hidden.dtype),
        LM_INT8=lm_int8,
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
