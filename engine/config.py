"""EngineConfig: the sizes and switches one engine runs with, resolved once at construction.

The builder (citer.builder) fills it from Engine's arguments after resolving what they
leave open (num_blocks from the KV memory budget, max_model_len from the models, whether
CUDA graphs are possible); the runtime reads these fields and nothing else.
"""
from dataclasses import dataclass

POSITIVE_INT_FIELDS = ("block_size", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
                       "max_graph_query_len", "num_blocks", "llm_batch_min")
LLM_PREFILL = ("lazy", "idle")


def check_positive_ints(**values) -> None:
    """Raise, naming the argument, unless each value given is a positive int (None: not given)."""
    for name, v in values.items():
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{name} must be a positive int, got {v!r}")


@dataclass(frozen=True)
class EngineConfig:
    device: str  # torch device string, e.g. "cpu", "cuda:0"
    block_size: int  # tokens per KV block (page)
    num_blocks: int  # KV blocks in the pool both models index
    max_model_len: int  # prompt + generated tokens per sequence, at most
    max_num_seqs: int = 64  # sequences running at once
    max_num_batched_tokens: int = 8192  # prompt tokens admitted per step (at least one request)
    cuda_graphs: bool = False  # replay CUDA graphs for the decode and short catch-up steps
    max_graph_query_len: int = 32  # LLM catch-ups up to this many tokens per sequence replay a graph
    profile: bool = False  # per-phase timers (SLM step, router, LLM catch-up, rest)
    seed: int = 0  # seeds requests that give no seed of their own
    max_llm_wait: int = 0  # steps a routed row may wait for its LLM call (SamplingParams may lower or raise it)
    llm_batch_min: int = 1  # the LLM runs once this many rows wait for it
    llm_prefill: str = "lazy"  # "idle": the LLM prefills prompts in steps without an LLM call

    def __post_init__(self):
        check_positive_ints(**{name: getattr(self, name) for name in POSITIVE_INT_FIELDS})

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)
