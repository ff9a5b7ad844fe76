"""Packing a ragged batch: positions [start, end) of each sequence -> the flat arrays a
forward reads (token ids, positions, KV slots, block tables, lengths, query offsets).

Both the eager step (arrays of its own size) and the CUDA-graph step (views of its
pinned staging buffer, with room for padding lanes after the real ones) pack through
`pack_batch`, so there is one copy of this logic.
"""
from dataclasses import dataclass
from typing import List, Sequence as Seq, Tuple

import numpy as np
import torch

from .models.attention import AttentionMetadata


@dataclass
class HostBatch:
    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64: flat KV slot of each token
    block_tables: np.ndarray  # [B, max_blocks] int32 (C-contiguous rows)
    seq_lens: np.ndarray  # [B] int32: context length incl. the new tokens
    query_start_loc: np.ndarray  # [B + 1] int32

    @classmethod
    def empty(cls, num_tokens: int, num_seqs: int, max_blocks: int) -> "HostBatch":
        return cls(np.empty(num_tokens, np.int64), np.empty(num_tokens, np.int64), np.empty(num_tokens, np.int64),
                   np.empty((num_seqs, max_blocks), np.int32), np.empty(num_seqs, np.int32),
                   np.empty(num_seqs + 1, np.int32))


def pack_batch(block_manager, sink_block: int, seqs: Seq, starts: List[int], ends: List[int],
               out: HostBatch) -> Tuple[int, int]:
    """Write the batch into out's first T token rows and B lanes (block-table columns
    past a sequence's blocks point at the sink block); -> (T, longest query)."""
    b = len(seqs)
    q_lens = np.asarray(ends, dtype=np.int64) - np.asarray(starts, dtype=np.int64)
    t = int(q_lens.sum())
    handles = [s.handle for s in seqs]
    out.input_ids[:t] = [tok for s, a, e in zip(seqs, starts, ends) for tok in s.token_ids[a:e]]
    out.positions[:t] = np.concatenate([np.arange(a, e) for a, e in zip(starts, ends)])
    block_manager.fill_slot_mapping(handles, np.asarray(starts, np.int64), np.asarray(ends, np.int64),
                                    out.slot_mapping[:t])
    block_manager.fill_block_tables(handles, out.block_tables[:b], sink_block)
    out.seq_lens[:b] = ends
    out.query_start_loc[0] = 0
    np.cumsum(q_lens, out=out.query_start_loc[1:b + 1])
    return t, int(q_lens.max())


def eager_inputs(block_manager, sink_block: int, block_size: int, seqs: Seq, starts: List[int], ends: List[int],
                 device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """-> (input_ids [T], positions [T], attention metadata) on the device, sized to the batch."""
    max_seq_len = int(max(ends))
    host = HostBatch.empty(sum(e - a for a, e in zip(starts, ends)), len(seqs), -(-max_seq_len // block_size))
    _, max_query_len = pack_batch(block_manager, sink_block, seqs, starts, ends, host)
    meta = AttentionMetadata(
        slot_mapping=torch.from_numpy(host.slot_mapping).to(device),
        block_tables=torch.from_numpy(host.block_tables).to(device),
        seq_lens=torch.from_numpy(host.seq_lens).to(device),
        query_start_loc=torch.from_numpy(host.query_start_loc).to(device),
        max_query_len=max_query_len,
        max_seq_len=max_seq_len,
    )
    return torch.from_numpy(host.input_ids).to(device), torch.from_numpy(host.positions).to(device), meta
