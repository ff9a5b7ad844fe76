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
import triton

from . import cpu_ext
from .paged_attention_kernels import _paged_merge_kernel, _paged_prefill_kernel, _paged_split_kv_kernel
from .triton_utils import dot_fp32, sm_count as device_sm_count

FAST_ATTENTION_ROWS = cpu_ext.ext.ATTENTION_MAX_ROWS if cpu_ext.AVAILABLE else 0

DECODE_SPLITS_CPU = 8  # under the interpreter: few programs (its cost is per program)
SPLIT_KV_MAX_Q = 16  # max_query_len up to this (decode, short catch-ups): the split-KV kernel
DECODE_TILE_N = 64
PREFILL_TILE_N = 32
PREFILL_ROWS = 64  # query rows (tokens x packed heads) per prefill program


def paged_attention_cpu(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, max_query_len,
                        max_seq_len, num_splits=None):
    """paged_attention_ref's contract. On CPUs with citer's AVX-512 kernels, decode steps and
    short catch-ups (query rows x query heads per KV head up to the kernel's limit) read the
    paged cache in place (csrc/cpu_attention.inc: online softmax in float32); other calls,
    and other CPUs, take the reference."""
    group = q.shape[1] // k_cache.shape[2]
    if FAST_ATTENTION_ROWS and q.device.type == "cpu" and max_query_len * group <= FAST_ATTENTION_ROWS \
            and q.dtype == k_cache.dtype == v_cache.dtype and q.dtype in (torch.float32, torch.bfloat16) \
            and q.shape[2] <= 256 and k_cache.is_contiguous() and v_cache.is_contiguous():
        return cpu_ext.ext.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, float(scale))
    return paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, max_query_len,
                               max_seq_len, num_splits)


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
    """Gathers each sequence's context into a padded [B, Hkv, S, D] batch and calls SDPA."""
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


def decode_num_splits(num_seqs: int, num_kv_heads: int, device: torch.device, sm_count=None) -> int:
    """Split count of the decode kernel: a power of two from the batch shape and the device
    only (so a captured graph's grid stays valid for any context lengths), aiming at about
    four programs per SM at long contexts; between 16 and 128."""
    if device.type != "cuda" and sm_count is None:
        return DECODE_SPLITS_CPU
    if sm_count is None:
        sm_count = device_sm_count(device)
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


def paged_attention_splits(num_seqs: int, max_query_len: int, num_heads: int, num_kv_heads: int,
                           device: torch.device):
    """The attention op's split policy, asked by code that launches it with extra empty
    lanes (CUDA graphs): the split-KV count an eager batch of this shape gets, or None
    where the launch has no split count (the prefill kernel)."""
    if max_query_len > SPLIT_KV_MAX_Q:
        return None
    return split_kv_num_splits(num_seqs, max_query_len, num_heads, num_kv_heads, device)


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
    use_fp32_dot = dot_fp32(k_cache.dtype)
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
            TILE_N=DECODE_TILE_N, NUM_SPLITS=splits, DOT_FP32=use_fp32_dot,
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
        TILE_N=PREFILL_TILE_N, DOT_FP32=use_fp32_dot,
    )
    return out
