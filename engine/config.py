"""EngineConfig: sizes and switches of one engine, fixed at construction."""
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class EngineConfig:
    device: str = "cpu"
    dtype: str = "float32"
    block_size: int = 16
    num_blocks: Optional[int] = None  # None: from kv_cache_memory
    kv_cache_memory: Optional[int] = None  # bytes for both models' KV caches; None: a default
    max_model_len: int = 2048
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192  # prompt tokens admitted per step (at least one request)
    backend: Optional[str] = None  # "torch" | "triton"; None: CITER_BACKEND or by device
    attention: Optional[str] = None  # "flash-attn": flash-attn's paged attention; None: the backend's
    enforce_eager: bool = False  # True: no CUDA graphs
    max_graph_query_len: int = 32  # LLM catch-ups up to this many tokens per sequence replay a graph
    profile: bool = False  # per-phase timers (SLM step, router, LLM catch-up, rest)
    seed: int = 0  # seeds requests that give no seed of their own

    def __post_init__(self):
        for name in ("block_size", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "max_graph_query_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.num_blocks is not None and (not isinstance(self.num_blocks, int) or self.num_blocks < 1):
            raise ValueError(f"num_blocks must be a positive int, got {self.num_blocks!r}")

    @property
    def use_cuda_graphs(self) -> bool:
        """Graphs capture the Triton kernels' fused step on CUDA; profiling times the phases
        apart, so it runs eagerly."""
        return self.device.startswith("cuda") and self.backend == "triton" and not self.enforce_eager \
            and not self.profile

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)
