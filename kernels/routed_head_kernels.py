"""The routed head's Triton kernels; routed_head.py holds the wrapper that launches them
and the torch reference they are tested against.

Three launches; none materialises [B, V] logits:
  1. the RMSNorm kernel (rmsnorm.py) -> the normed rows h [B, H] in the hidden dtype,
     rounded exactly like the reference (weight * x.to(dtype)).
  2. _head_partial_kernel, grid (V_SPLITS, cdiv(B, BLOCK_B)): program (s, bb) owns the
     vocab range of split s and a tile of BLOCK_B rows. Each [BLOCK_V, BLOCK_H] lm_head
     tile is loaded once for all BLOCK_B rows and multiplied with tl.dot (fp32
     accumulation; an int8 lm_head's tiles go in as their integer values, exact in the
     hidden dtype, and each logit is multiplied by its row's scale after the dot); per
     row it keeps the running argmax (strict '>' across tiles, and tl.argmax's first
     index within a tile: torch.argmax's lowest-index tie-break), the running top-2 of
     the raw logits, sum exp(l - max) and sum exp(l - max) * (l - max)
     (online logsumexp and entropy, rescaled whenever the max moves) and, for rows with
     temperature >= MIN_TEMPERATURE, the Gumbel-max choice argmax(logit / T + G) with
     G = -log(-log(U)), U = tl.rand(seed_b, token_id): the noise depends only on the
     row's seed and the token id, not on the batch or the split layout. With a router,
     the same program also takes its share (split s) of the router's R hidden units, so
     the router streams with the whole GPU too: a hidden-only router's
     sum_r relu(h . W1[r] + b1[r]) * w2[r]; a head-signal router's pre-activations
     h . W1[r] (the signals are known only after the vocabulary is merged).
  3. _head_reduce_kernel, grid (B): merges the splits -> token, top_prob, the head's
     signals and the router score (a head-signal router's ReLU layer is finished here:
     R units per row, a few KB).
V_SPLITS defaults to about four programs per SM: a batch-1 call streams the lm_head with
the whole GPU, and a batch of up to 64 rows reads every lm_head byte once.
"""
import triton
import triton.language as tl


@triton.jit
def _head_partial_kernel(
    h_ptr,  # [B, H] normed hidden rows, contiguous (hidden dtype)
    lm_head_ptr,  # [V, H], row stride lm_stride, unit stride along H (hidden dtype, or int8 with LM_INT8)
    lm_scale_ptr,  # [V] float32: an int8 lm_head's per-row scales (unused otherwise)
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
    LM_INT8: tl.constexpr,  # int8 lm_head: its values (exact in any float dtype) into the dot, the scale after it
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
                acc += tl.dot(x, tl.trans(w.to(x.dtype)))
        if LM_INT8:
            acc = acc * tl.load(lm_scale_ptr + vo, mask=vmask, other=1.0)[None, :]
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
