"""Paged attention over a block-table KV cache: varlen prefill / catch-up and decode.

Layout (flash-attn / vLLM / FlashInfer): caches are [num_blocks, block_size, Hkv, D];
sequence b's token position p lives at (block_tables[b, p // block_size], p % block_size).

Queries of all sequences are packed: sequence b owns rows
query_start_loc[b] : query_start_loc[b + 1] of q, and those rows are its *last* q_len
positions, i.e. query row i sits at position seq_lens[b] - q_len + i. The keys and values
of every position < seq_lens[b] (including the new ones) are already in the cache.
Attention is causal by position. Decode is the case q_len == 1 for every sequence.
"""
import torch
import torch.nn.functional as F


def paged_attention_ref(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [B] int32, context length incl. the new tokens
    query_start_loc: torch.Tensor,  # [B + 1] int32, cumulative query lengths
    scale: float,
    max_query_len: int,
    max_seq_len: int,
    num_splits=None,  # the Triton kernel's split-KV count; no effect here
) -> torch.Tensor:  # [T, Hq, D]
    num_seqs = seq_lens.shape[0]
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    num_tokens, num_heads, _ = q.shape
    nb = (max_seq_len + block_size - 1) // block_size
    tables = block_tables[:, :nb].long()
    # Gather each sequence's context: [B, Hkv, S, D]
    k = k_cache[tables].reshape(num_seqs, nb * block_size, num_kv_heads, head_dim)
    v = v_cache[tables].reshape(num_seqs, nb * block_size, num_kv_heads, head_dim)
    k = k[:, :max_seq_len].transpose(1, 2).to(q.dtype)
    v = v[:, :max_seq_len].transpose(1, 2).to(q.dtype)
    gqa = num_heads != num_kv_heads

    if num_tokens == num_seqs * max_query_len:
        # Uniform query length (decode, or one sequence): no padding needed.
        qp = q.view(num_seqs, max_query_len, num_heads, head_dim).transpose(1, 2)
        uniform = True
    else:
        q_lens = (query_start_loc[1:] - query_start_loc[:-1]).long()
        row_seq = torch.repeat_interleave(torch.arange(num_seqs, device=q.device), q_lens)
        row_off = torch.arange(num_tokens, device=q.device) - query_start_loc[:-1].long()[row_seq]
        qp = q.new_zeros(num_seqs, max_query_len, num_heads, head_dim)
        qp[row_seq, row_off] = q
        qp = qp.transpose(1, 2)
        uniform = False

    seq_lens_l = seq_lens.long()
    q_lens_l = (query_start_loc[1:] - query_start_loc[:-1]).long()
    all_full = bool((seq_lens_l == max_seq_len).all())
    mask, causal = None, False
    if uniform and max_query_len == 1 and all_full:
        pass  # plain decode, all contexts of equal length: no mask
    elif uniform and num_seqs == 1 and max_query_len == max_seq_len:
        causal = True  # one sequence prefilled from position 0
    else:
        # query row i of sequence b sits at position seq_len - q_len + i
        qpos = (seq_lens_l - q_lens_l)[:, None] + torch.arange(max_query_len, device=q.device)[None, :]
        kpos = torch.arange(max_seq_len, device=q.device)
        mask = kpos[None, None, :] <= qpos[:, :, None]  # [B, Q, S]
        mask[:, :, 0] = True  # keep padded query rows finite; they are dropped below
        mask = mask[:, None]
    out = F.scaled_dot_product_attention(
        qp, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa
    )
    out = out.transpose(1, 2)  # [B, Q, Hq, D]
    if uniform:
        return out.reshape(num_tokens, num_heads, head_dim)
    return out[row_seq, row_off]


# ---------------------------------------------------------------------------------------
# Triton kernels
#
# Keys and values are read in tiles of TILE_N consecutive positions; each position finds
# its page through the block table, so a tile may span several pages and any block_size
# works (on a GPU tl.dot needs tile dims >= 16, which TILE_N and the padded head rows
# guarantee whatever the page size). Cache offsets are int64 (block index * block stride).
#
# GQA: the QH = Hq / Hkv query heads that share a KV head are packed into the rows (the
# dot's M dimension) of one tile, so each K/V tile is loaded once per KV head, not once
# per query head.
#
# Decode and short catch-ups (max_query_len <= SPLIT_KV_MAX_Q): split-KV. Grid (B, Hkv,
# query blocks x NUM_SPLITS); split s of a query block takes a contiguous, TILE_N-aligned
# share of the keys that block needs and writes a partial output and its log-sum-exp per
# (token, head); a merge kernel combines the splits. A one-token decode or a few-token
# LLM catch-up on a long context thus streams its KV with the whole GPU, not with B x Hkv
# programs. NUM_SPLITS depends only on the batch size, the query-length bound, Hkv and the
# device (never on the context lengths), so the launch is CUDA-graph capturable; splits
# past a short context exit at once.
#
# Longer varlen prefills: grid (B, Hkv, cdiv(max_query_len, BLOCK_Q)); a program owns
# BLOCK_Q query tokens x QH heads of one sequence and walks that sequence's keys up to
# its last query's position, causal by position.
#
# DOT_FP32 computes the dots in float32 with input_precision="ieee" (fp32 caches on a GPU,
# and always under the interpreter, whose bf16 arithmetic is unreliable); otherwise
# fp16/bf16 operands with fp32 accumulation. Softmax state is always fp32.
# ---------------------------------------------------------------------------------------
import functools  # noqa: E402
import os  # noqa: E402

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

DECODE_SPLITS_CPU = 8  # under the interpreter: few programs (its cost is per program)
SPLIT_KV_MAX_Q = 16  # max_query_len up to this (decode, short catch-ups): the split-KV kernel
DECODE_TILE_N = 64
PREFILL_TILE_N = 32
PREFILL_ROWS = 64  # query rows (tokens x packed heads) per prefill program


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

    r = tl.arange(0, BLOCK_Q * BLOCK_H)
    tok = qb * BLOCK_Q + r // BLOCK_H
    hh = r % BLOCK_H
    rmask = (tok < q_len) & (hh < QH)
    qpos = first_pos + tok
    heads = kvh * QH + hh
    d = tl.arange(0, BLOCK_D)
    qrow = (q_start + tok) * q_stride_t + heads * q_stride_h
    q = tl.load(q_ptr + qrow[:, None] + d[None, :], mask=rmask[:, None] & (d[None, :] < D), other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
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

    r = tl.arange(0, BLOCK_Q * BLOCK_H)
    tok = qb * BLOCK_Q + r // BLOCK_H
    hh = r % BLOCK_H
    rmask = (tok < q_len) & (hh < QH)
    qpos = first_pos + tok
    heads = kvh * QH + hh
    d = tl.arange(0, BLOCK_D)
    qrow = (q_start + tok) * q_stride_t + heads * q_stride_h
    q = tl.load(q_ptr + qrow[:, None] + d[None, :], mask=rmask[:, None] & (d[None, :] < D), other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
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


def _dot_fp32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def decode_num_splits(num_seqs: int, num_kv_heads: int, device: torch.device, sm_count=None) -> int:
    """Split count of the decode kernel: a power of two from the batch shape and the device
    only (so a captured graph's grid stays valid for any context lengths), aiming at about
    four programs per SM at long contexts; between 16 and 128."""
    if device.type != "cuda" and sm_count is None:
        return DECODE_SPLITS_CPU
    if sm_count is None:
        sm_count = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    want = triton.cdiv(4 * sm_count, max(1, num_seqs * num_kv_heads))
    return min(128, max(16, triton.next_power_of_2(want)))


def _split_kv_block_q(max_query_len: int, block_h: int) -> int:
    # rows = BLOCK_Q tokens x BLOCK_H heads: at least 16 (the dot's M), at most 64
    return max(16 // block_h, min(triton.next_power_of_2(max_query_len), PREFILL_ROWS // block_h), 1)


def split_kv_num_splits(num_seqs: int, max_query_len: int, num_heads: int, num_kv_heads: int,
                        device: torch.device) -> int:
    """The split count paged_attention_triton picks for this batch shape. A CUDA graph
    whose batch carries extra empty lanes passes the count of its real-lane bucket, so
    it splits like the eager step."""
    block_h = triton.next_power_of_2(num_heads // num_kv_heads)
    q_blocks = triton.cdiv(max_query_len, _split_kv_block_q(max_query_len, block_h))
    return decode_num_splits(num_seqs * q_blocks, num_kv_heads, device)


def paged_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                           max_query_len, max_seq_len, num_splits=None):
    """Same contract as paged_attention_ref. q: unit stride along D (heads may be a strided
    view, e.g. of a fused qkv projection); caches contiguous; block_tables int32 with
    unit stride along its columns; seq_lens / query_start_loc int32. max_query_len may be
    an upper bound (it sizes the grid and picks the kernel); max_seq_len is not read (the
    kernels use seq_lens), so a captured graph may pass any bound for it.

    max_query_len <= SPLIT_KV_MAX_Q (decode, short catch-ups): split-KV kernel + merge;
    otherwise the varlen prefill kernel. num_splits overrides the split count (a power of
    two)."""
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if q.stride(-1) != 1 or not k_cache.is_contiguous() or not v_cache.is_contiguous():
        raise ValueError("paged_attention needs unit-stride q and contiguous caches")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if block_tables.stride(-1) != 1:
        raise ValueError("block_tables needs unit stride along its columns")
    qh = num_heads // num_kv_heads
    block_h = triton.next_power_of_2(qh)
    block_d = max(16, triton.next_power_of_2(head_dim))
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    strides = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2))
    dot_fp32 = _dot_fp32(k_cache.dtype)
    if max_query_len <= SPLIT_KV_MAX_Q:
        block_q = _split_kv_block_q(max_query_len, block_h)
        q_blocks = triton.cdiv(max_query_len, block_q)
        splits = num_splits or split_kv_num_splits(num_seqs, max_query_len, num_heads, num_kv_heads, q.device)
        if splits & (splits - 1):
            raise ValueError(f"num_splits must be a power of two, got {splits}")
        part_out = torch.empty((num_tokens, num_heads, splits, block_d), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((num_tokens, num_heads, splits), dtype=torch.float32, device=q.device)
        _paged_split_kv_kernel[(num_seqs, num_kv_heads, q_blocks * splits)](
            q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, part_out, part_lse, scale,
            q.stride(0), q.stride(1), block_tables.stride(0), *strides, num_heads,
            QH=qh, BLOCK_H=block_h, BLOCK_Q=block_q, D=head_dim, BLOCK_D=block_d, BLOCK_SIZE=block_size,
            TILE_N=DECODE_TILE_N, NUM_SPLITS=splits, DOT_FP32=dot_fp32,
        )
        _paged_merge_kernel[(num_tokens * num_heads,)](
            part_out, part_lse, out, D=head_dim, BLOCK_D=block_d, NUM_SPLITS=splits,
            num_warps=8 if splits * block_d >= 8192 else 4,
        )
        return out
    block_q = max(1, PREFILL_ROWS // block_h)
    grid = (num_seqs, num_kv_heads, triton.cdiv(max_query_len, block_q))
    _paged_prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out, scale,
        q.stride(0), q.stride(1), block_tables.stride(0), *strides, num_heads,
        QH=qh, BLOCK_H=block_h, BLOCK_Q=block_q, D=head_dim, BLOCK_D=block_d, BLOCK_SIZE=block_size,
        TILE_N=PREFILL_TILE_N, DOT_FP32=dot_fp32,
    )
    return out
