"""The attention interface between the model code and the engine.

The engine describes a (ragged, packed) batch with AttentionMetadata; every attention
layer stores its new keys/values through slot_mapping and attends over the paged cache
through the backend's ops (torch references on CPU, Triton kernels on CUDA, flash-attn
as an option). The model never sees blocks or sequences beyond this.
"""
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: flat cache slot of each new token (-1 = skip)
    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32: context length incl. the new tokens
    query_start_loc: torch.Tensor  # [B + 1] int32: packed query offsets
    max_query_len: int
    max_seq_len: int
    num_splits: Optional[int] = None  # split-KV count override (CUDA graphs); None: the kernel's choice


KVCache = List[Tuple[torch.Tensor, torch.Tensor]]  # per layer (k, v): [N, block_size, Hkv, D]


def paged_attention(ops, q, k, v, kv: Tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata, scale: float):
    """q [T, Hq, D], k/v [T, Hkv, D] for the new tokens -> [T, Hq, D]."""
    k_cache, v_cache = kv
    ops.store_kvcache(k, v, k_cache, v_cache, meta.slot_mapping)
    return ops.paged_attention(
        q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
        scale, meta.max_query_len, meta.max_seq_len, num_splits=meta.num_splits,
    )
