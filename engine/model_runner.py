"""ModelRunner: one model, its KV pool, and the packing of ragged batches.

Both models index their own KV storage with the same block tables (one page table per
sequence). Storage per layer is [num_blocks + 1, block_size, Hkv, D]; the extra last
block is a sink that padded lanes may write to.
"""
from typing import List, Sequence as Seq

import numpy as np
import torch

from citer.models.attention import AttentionMetadata


class ModelRunner:
    def __init__(self, model, cfg, ops, block_manager, num_blocks: int, block_size: int,
                 device: torch.device, dtype: torch.dtype):
        self.model, self.cfg, self.ops, self.bm = model, cfg, ops, block_manager
        self.device, self.dtype = device, dtype
        self.block_size = block_size
        self.sink_block = num_blocks
        self.graphs = None  # a cuda_graph.GraphedStep when the engine uses CUDA graphs
        shape = (num_blocks + 1, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_cache = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(cfg.num_layers)
        ]

    @staticmethod
    def kv_bytes_per_block(cfg, block_size: int, dtype: torch.dtype) -> int:
        return cfg.kv_bytes_per_token * block_size * torch.empty((), dtype=dtype).element_size()

    def prepare(self, seqs: Seq, starts: List[int], ends: List[int]):
        """Pack positions [start, end) of each sequence -> (input_ids, positions, metadata)."""
        q_lens = np.asarray(ends, dtype=np.int64) - np.asarray(starts, dtype=np.int64)
        handles = [s.handle for s in seqs]
        input_ids = [t for s, a, b in zip(seqs, starts, ends) for t in s.token_ids[a:b]]
        positions = np.concatenate([np.arange(a, b) for a, b in zip(starts, ends)])
        slot_mapping = np.empty(int(q_lens.sum()), dtype=np.int64)
        self.bm.fill_slot_mapping(handles, np.asarray(starts, np.int64), np.asarray(ends, np.int64), slot_mapping)
        max_seq_len = int(max(ends))
        block_tables = np.empty((len(seqs), -(-max_seq_len // self.block_size)), dtype=np.int32)
        self.bm.fill_block_tables(handles, block_tables, self.sink_block)
        query_start_loc = np.zeros(len(seqs) + 1, dtype=np.int32)
        np.cumsum(q_lens, out=query_start_loc[1:])
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(slot_mapping).to(dev),
            block_tables=torch.from_numpy(block_tables).to(dev),
            seq_lens=torch.tensor(ends, dtype=torch.int32, device=dev),
            query_start_loc=torch.from_numpy(query_start_loc).to(dev),
            max_query_len=int(q_lens.max()),
            max_seq_len=max_seq_len,
        )
        ids = torch.tensor(input_ids, dtype=torch.long, device=dev)
        return ids, torch.from_numpy(positions).to(dev), meta

    @torch.inference_mode()
    def forward(self, seqs: Seq, starts: List[int], ends: List[int]) -> torch.Tensor:
        """Run positions [start, end) of each sequence -> pre-norm hidden of each last position [B, H]."""
        ids, positions, meta = self.prepare(seqs, starts, ends)
        hidden = self.model(self.ops, ids, positions, self.kv_cache, meta)
        last = meta.query_start_loc[1:].long() - 1
        return hidden[last]
