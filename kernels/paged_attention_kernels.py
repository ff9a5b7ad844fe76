"""The Triton kernels behind paged_attention_triton (paged_attention.py holds the torch
reference, the wrapper that picks and launches these, and the split-count policy).

Keys and values are read in tiles of TILE_N consecutive positions; each position finds
its page through the block table, so a tile may span several pages and any block_size
works (on a GPU tl.dot needs tile dims >= 16, which TILE_N and the padded head rows
guarantee whatever the page size). Cache offsets are int64 (block index * block stride).

GQA: the QH = Hq / Hkv query heads that share a KV head are packed into the rows (the
dot's M dimension) of one tile, so each K/V tile is loaded once per KV head, not once
per query head.

Decode and short catch-ups (max_query_len <= SPLIT_KV_MAX_Q): split-KV. Grid (B, Hkv,
query blocks x NUM_SPLITS); split s of a query block takes a contiguous, TILE_N-aligned
share of the keys that block needs and writes a partial output and its log-sum-exp per
(token, head); a merge kernel combines the splits. A one-token decode or a few-token
LLM catch-up on a long context thus streams its KV with the whole GPU, not with B x Hkv
programs. NUM_SPLITS depends only on the batch size, the query-length bound, Hkv and the
device (never on the context lengths), so the launch is CUDA-graph capturable; splits
past a short context exit at once.

Longer varlen prefills: grid (B, Hkv, cdiv(max_query_len, BLOCK_Q)); a program owns
BLOCK_Q query tokens x QH heads of one sequence and walks that sequence's keys up to
its last query's position, causal by position.

DOT_FP32 computes the dots in float32 with input_precision="ieee" (fp32 caches on a GPU,
and always under the interpreter, whose bf16 arithmetic is unreliable); otherwise
fp16/bf16 operands with fp32 accumulation. Softmax state is always fp32.
"""
import triton
import triton.language as tl


@triton.jit
def _attend_tile(q, m, l, acc,
                 k_cache_ptr,  # [num_blocks, block_size, Hkv, D]
                 v_cache_ptr,  # [num_blocks, block_size, Hkv, D]
                 bt_row_ptr,  # [max_blocks] int32: this sequence's block table row
                 t0, kv_end, kvh, qpos, stride_kb, stride_kt, stride_kh, scale,
                 D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr,
                 CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr):
    """Online softmax over key positions t0 .. t0 + TILE_N (those < kv_end) for q [M, BLOCK_D]."""
    pos = t0 + tl.arange(0, TILE_N)
    tmask = pos < kv_end
    blk = tl.load(bt_row_ptr + pos // BLOCK_SIZE, mask=tmask, other=0).to(tl.int64)
    row_off = blk * stride_kb + (pos % BLOCK_SIZE).to(tl.int64) * stride_kt + kvh * stride_kh  # [TILE_N]
    d = tl.arange(0, BLOCK_D)
    kvmask = tmask[:, None] & (d[None, :] < D)
    k = tl.load(k_cache_ptr + row_off[:, None] + d[None, :], mask=kvmask, other=0.0)
    v = tl.load(v_cache_ptr + row_off[:, None] + d[None, :], mask=kvmask, other=0.0)
    if DOT_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    else:
        s = tl.dot(q, tl.trans(k)) * scale
    if CAUSAL:
        valid = tmask[None, :] & (pos[None, :] <= qpos[:, None])
    else:
        valid = tmask[None, :] & (qpos[:, None] >= 0)
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet stay at zero
    alpha = tl.exp(m - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    if DOT_FP32:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l, acc


@triton.jit
def _load_query_block(q_ptr,  # [T, Hq, D], strides (q_stride_t, q_stride_h, 1)
                      q_start, q_len, first_pos, qb, kvh, q_stride_t, q_stride_h,
                      QH: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_Q: tl.constexpr, D: tl.constexpr,
                      BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr):
    """Query block qb of one sequence and KV head: BLOCK_Q tokens x the QH query heads of
    KV head kvh, packed into rows -> (q [rows, BLOCK_D], token index, query head, row
    mask, position) per row."""
    r = tl.arange(0, BLOCK_Q * BLOCK_H)
    tok = qb * BLOCK_Q + r // BLOCK_H
    hh = r % BLOCK_H
    rmask = (tok < q_len) & (hh < QH)
    heads = kvh * QH + hh
    d = tl.arange(0, BLOCK_D)
    qrow = (q_start + tok) * q_stride_t + heads * q_stride_h
    q = tl.load(q_ptr + qrow[:, None] + d[None, :], mask=rmask[:, None] & (d[None, :] < D), other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    return q, tok, heads, rmask, first_pos + tok


@triton.jit
def _paged_split_kv_kernel(
    q_ptr,  # [T, Hq, D], strides (q_stride_t, q_stride_h, 1)
    k_cache_ptr,  # [num_blocks, block_size, Hkv, D], strides (stride_kb, stride_kt, stride_kh, 1)
    v_cache_ptr,  # [num_blocks, block_size, Hkv, D], same strides as k_cache
    block_tables_ptr,  # [B, max_blocks] int32, row stride bt_stride
    seq_lens_ptr,  # [B] int32: context length incl. the new tokens
    query_start_loc_ptr,  # [B + 1] int32: packed query offsets
    part_out_ptr,  # [T, Hq, NUM_SPLITS, BLOCK_D] float32 out: per-split normalised output
    part_lse_ptr,  # [T, Hq, NUM_SPLITS] float32 out: per-split log-sum-exp (-inf: no key)
    scale,
    q_stride_t,
    q_stride_h,
    bt_stride,
    stride_kb,
    stride_kt,
    stride_kh,
    Hq,
    QH: tl.constexpr,  # query heads per KV head
    BLOCK_H: tl.constexpr,  # next power of two >= QH
    BLOCK_Q: tl.constexpr,  # query tokens per program; rows = BLOCK_Q * BLOCK_H (>= 16)
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next power of two >= D, at least 16
    BLOCK_SIZE: tl.constexpr,  # tokens per page
    TILE_N: tl.constexpr,  # key positions per iteration
    NUM_SPLITS: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    qb = tl.program_id(2) // NUM_SPLITS
    split = tl.program_id(2) % NUM_SPLITS
    q_start = tl.load(query_start_loc_ptr + b).to(tl.int64)
    q_len = (tl.load(query_start_loc_ptr + b + 1) - q_start).to(tl.int32)
    if qb * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    first_pos = seq_len - q_len  # position of this sequence's first query
    q, tok, heads, rmask, qpos = _load_query_block(q_ptr, q_start, q_len, first_pos, qb, kvh, q_stride_t,
                                                   q_stride_h, QH, BLOCK_H, BLOCK_Q, D, BLOCK_D, DOT_FP32)
    d = tl.arange(0, BLOCK_D)
    m = tl.full([BLOCK_Q * BLOCK_H], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_Q * BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q * BLOCK_H, BLOCK_D], dtype=tl.float32)
    # keys this query block needs: positions < kv_end; this split takes a TILE_N-aligned share
    kv_end = tl.minimum(first_pos + (qb + 1) * BLOCK_Q, seq_len)
    per_split = tl.cdiv(tl.cdiv(kv_end, NUM_SPLITS), TILE_N) * TILE_N
    t_start = split * per_split
    t_end = tl.minimum(t_start + per_split, kv_end)
    bt_row = block_tables_ptr + b * bt_stride
    for t0 in range(t_start, t_end, TILE_N):
        m, l, acc = _attend_tile(q, m, l, acc, k_cache_ptr, v_cache_ptr, bt_row, t0, t_end, kvh, qpos,
                                 stride_kb, stride_kt, stride_kh, scale, D, BLOCK_D, BLOCK_SIZE, TILE_N,
                                 True, DOT_FP32)
    has = l > 0
    out = tl.where(has[:, None], acc / tl.where(has, l, 1.0)[:, None], 0.0)
    lse = tl.where(has, m + tl.log(tl.where(has, l, 1.0)), float("-inf"))
    prow = ((q_start + tok) * Hq + heads) * NUM_SPLITS + split
    tl.store(part_out_ptr + prow[:, None] * BLOCK_D + d[None, :], out, mask=rmask[:, None])
    tl.store(part_lse_ptr + prow, lse, mask=rmask)


@triton.jit
def _paged_merge_kernel(
    part_out_ptr,  # [T, Hq, NUM_SPLITS, BLOCK_D] float32
    part_lse_ptr,  # [T, Hq, NUM_SPLITS] float32
    out_ptr,  # [T, Hq, D] contiguous
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # token * Hq + head
    s = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, BLOCK_D)
    lse = tl.load(part_lse_ptr + row * NUM_SPLITS + s)
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)  # no key at all (a padded lane): output zeros
    w = tl.exp(lse - m)  # empty splits: exp(-inf) = 0
    parts = tl.load(part_out_ptr + (row * NUM_SPLITS + s[:, None]) * BLOCK_D + d[None, :])
    total = tl.sum(w, axis=0)
    out = tl.sum(parts * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * D + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


@triton.jit
def _paged_prefill_kernel(
    q_ptr,  # [T, Hq, D], strides (q_stride_t, q_stride_h, 1)
    k_cache_ptr,  # [num_blocks, block_size, Hkv, D], strides (stride_kb, stride_kt, stride_kh, 1)
    v_cache_ptr,  # [num_blocks, block_size, Hkv, D], same strides as k_cache
    block_tables_ptr,  # [B, max_blocks] int32, row stride bt_stride
    seq_lens_ptr,  # [B] int32: context length incl. the new tokens
    query_start_loc_ptr,  # [B + 1] int32: packed query offsets
    out_ptr,  # [T, Hq, D] contiguous
    scale,
    q_stride_t,
    q_stride_h,
    bt_stride,
    stride_kb,
    stride_kt,
    stride_kh,
    Hq,
    QH: tl.constexpr,  # query heads per KV head
    BLOCK_H: tl.constexpr,  # next power of two >= QH
    BLOCK_Q: tl.constexpr,  # query tokens per program; rows = BLOCK_Q * BLOCK_H (>= 16)
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next power of two >= D, at least 16
    BLOCK_SIZE: tl.constexpr,  # tokens per page
    TILE_N: tl.constexpr,  # key positions per iteration
    DOT_FP32: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    qb = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + b).to(tl.int64)
    q_len = (tl.load(query_start_loc_ptr + b + 1) - q_start).to(tl.int32)
    if qb * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    first_pos = seq_len - q_len  # position of this sequence's first query
    q, tok, heads, rmask, qpos = _load_query_block(q_ptr, q_start, q_len, first_pos, qb, kvh, q_stride_t,
                                                   q_stride_h, QH, BLOCK_H, BLOCK_Q, D, BLOCK_D, DOT_FP32)
    d = tl.arange(0, BLOCK_D)
    m = tl.full([BLOCK_Q * BLOCK_H], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_Q * BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q * BLOCK_H, BLOCK_D], dtype=tl.float32)
    kv_end = tl.minimum(first_pos + (qb + 1) * BLOCK_Q, seq_len)  # keys needed: positions < kv_end
    bt_row = block_tables_ptr + b * bt_stride
    for t0 in range(0, kv_end, TILE_N):
        m, l, acc = _attend_tile(q, m, l, acc, k_cache_ptr, v_cache_ptr, bt_row, t0, kv_end, kvh, qpos,
                                 stride_kb, stride_kt, stride_kh, scale, D, BLOCK_D, BLOCK_SIZE, TILE_N,
                                 True, DOT_FP32)
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    orow = (q_start + tok) * Hq * D + heads * D
    tl.store(out_ptr + orow[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & (d[None, :] < D))
