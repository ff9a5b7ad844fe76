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
        row_seq = torch.repeat_interleave(torch.arange(num_seqs), q_lens)
        row_off = torch.arange(num_tokens) - query_start_loc[:-1].long()[row_seq]
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
        qpos = (seq_lens_l - q_lens_l)[:, None] + torch.arange(max_query_len)[None, :]
        kpos = torch.arange(max_seq_len)
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
