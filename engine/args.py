"""EngineArgs: every argument an engine is built from, in one dataclass, checked once.

`Engine(slm, llm, router, **options)` builds one from its arguments, `Engine.from_args(args)`
takes one, `AsyncEngine` and `citer serve` pass one through (the CLI's flags are made
from these fields: `EngineArgs.add_cli_args`). The builder (citer.builder) resolves what
it leaves open (the embedded pair when no model is given, num_blocks from the KV memory
budget, max_model_len from the models, CUDA graphs) into an EngineConfig.
"""
import argparse
import dataclasses
import numbers
from dataclasses import dataclass, field
from typing import Optional

from citer.kernels.flash_attention import ATTENTION_CHOICES
from citer.kernels.ops import BACKENDS

from .config import LLM_PREFILL
from .models.loader import DTYPES
from .models.quantize import QUANTIZATIONS


@dataclass
class EngineArgs:
    slm: Optional[str] = field(default=None, metadata={"help": "the small model: an HF folder (or a .gguf file)"})
    llm: Optional[str] = field(default=None, metadata={"help": "the large model: an HF folder (or a .gguf file)"})
    router: Optional[str] = field(default=None, metadata={"help": "a router folder (citer train-router's output)"})
    device: str = field(default="cpu", metadata={"help": "torch device of both models, e.g. cpu, cuda, cuda:1"})
    slm_device: Optional[str] = field(default=None, metadata={"help": "the SLM's device (default: device)"})
    llm_device: Optional[str] = field(default=None, metadata={"help": "the LLM's device (default: device); with "
                                                                     "tensor parallelism cpu or cuda (ranks on "
                                                                     "cuda:0..N-1)"})
    llm_tensor_parallel_size: int = field(default=1, metadata={"help": "ranks the LLM is split over "
                                                                      "(torch.distributed: NCCL on GPUs, gloo on CPU)"})
    tp_timeout: float = field(default=300.0, metadata={"help": "seconds a tensor-parallel collective may take "
                                                              "before the step fails"})
    dtype: str = field(default="float32", metadata={"help": f"weights and activations: {', '.join(DTYPES)}"})
    block_size: int = field(default=16, metadata={"help": "tokens per KV block (page)"})
    num_blocks: Optional[int] = field(default=None, metadata={"help": "KV blocks in the shared pool (default: "
                                                                     "from kv_cache_memory)"})
    kv_cache_memory: Optional[float] = field(default=None, metadata={"help": "bytes for both models' KV caches "
                                                                            "(default: 1 GiB on CPU, 85%% of "
                                                                            "free memory on CUDA)"})
    max_model_len: Optional[int] = field(default=None, metadata={"help": "prompt + generated tokens per request "
                                                                        "(default: the models' limit, at most 4096)"})
    max_num_seqs: int = field(default=64, metadata={"help": "requests running at once"})
    max_num_batched_tokens: int = field(default=8192, metadata={"help": "prompt tokens admitted per step"})
    backend: Optional[str] = field(default=None, metadata={"help": f"ops: {', '.join(BACKENDS)} (default: triton "
                                                                  "on CUDA, torch elsewhere; CITER_BACKEND)"})
    attention: Optional[str] = field(default=None, metadata={"help": "flash-attn: flash-attn's paged attention "
                                                                    "(CUDA, fp16/bf16)"})
    enforce_eager: bool = field(default=False, metadata={"help": "no CUDA graphs"})
    max_graph_query_len: int = field(default=32, metadata={"help": "LLM catch-ups up to this many tokens replay "
                                                                  "a CUDA graph"})
    cpu_threads: Optional[int] = field(default=None, metadata={"help": "CPU threads per op (default: all cores or "
                                                                      "one, whichever decode steps run faster now: "
                                                                      "engine/threads.py)"})
    quantization: Optional[str] = field(default=None, metadata={"help": "int8: weight-only int8 layer projections "
                                                                       "and lm_head (a tied embedding with it; "
                                                                       "per-channel scales)"})
    profile: bool = field(default=False, metadata={"help": "per-request time in SLM steps, router, LLM catch-up "
                                                          "and the rest (stats *_time)"})
    seed: int = field(default=0, metadata={"help": "seeds the requests that bring no seed of their own"})
    max_llm_wait: int = field(default=0, metadata={"help": "steps a row routed to the LLM may wait so that LLM "
                                                          "calls batch (0: the LLM runs in the step it is called)"})
    llm_batch_min: int = field(default=1, metadata={"help": "the LLM runs as soon as this many rows wait for it"})
    llm_prefill: str = field(default="lazy", metadata={"help": "lazy: the LLM reads a prompt at its first call; "
                                                              "idle: in steps without an LLM call, it prefills the "
                                                              "prompts of running requests that may call it"})

    def __post_init__(self):
        for name in ("slm", "llm", "router"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                if hasattr(v, "__fspath__"):
                    setattr(self, name, str(v.__fspath__()))
                else:
                    raise ValueError(f"{name} must be a path (str), got {type(v).__name__}")
        if self.router is not None and (self.slm is None) != (self.llm is None):
            raise ValueError("a router needs both an SLM and an LLM")
        for name in ("block_size", "num_blocks", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
                     "max_graph_query_len", "llm_batch_min", "llm_tensor_parallel_size", "cpu_threads"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(self.max_llm_wait, int) or isinstance(self.max_llm_wait, bool) or self.max_llm_wait < 0:
            raise ValueError(f"max_llm_wait must be an int >= 0 (steps), got {self.max_llm_wait!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {self.quantization!r}; choose one of {QUANTIZATIONS} or None")
        if self.llm_prefill not in LLM_PREFILL:
            raise ValueError(f"llm_prefill must be one of {LLM_PREFILL}, got {self.llm_prefill!r}")
        m = self.kv_cache_memory
        if m is not None and (isinstance(m, bool) or not isinstance(m, numbers.Real) or not 0 < m < float("inf")):
            raise ValueError(f"kv_cache_memory must be a positive number of bytes, got {m!r}")
        if m is not None and self.num_blocks is not None:
            raise ValueError(f"give num_blocks ({self.num_blocks}) or kv_cache_memory ({m!r}), not both: "
                             "kv_cache_memory sizes the pool that num_blocks names")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        for name in ("enforce_eager", "profile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {BACKENDS}")
        if self.attention is not None and self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"unknown attention {self.attention!r}; choose one of {ATTENTION_CHOICES} or None")
        if not (isinstance(self.dtype, str) and self.dtype in DTYPES) and self.dtype not in DTYPES.values():
            raise ValueError(f"unsupported dtype {self.dtype!r}; choose one of {list(DTYPES)}")
        for name in ("device", "slm_device", "llm_device"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                setattr(self, name, str(v))
        if not (isinstance(self.tp_timeout, (int, float)) and not isinstance(self.tp_timeout, bool)
                and self.tp_timeout > 0):
            raise ValueError(f"tp_timeout must be a positive number of seconds, got {self.tp_timeout!r}")

    @property
    def uses_default_pair(self) -> bool:
        """No model given: the embedded demo pair (citer.assets)."""
        return self.slm is None and self.llm is None and self.router is None

    # ---- the command line ------------------------------------------------------------
    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        """One --flag per field (--max-num-seqs for max_num_seqs), with its help."""
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            kind = cli_type(f)
            if kind is bool:
                parser.add_argument(flag, action="store_true", help=f.metadata["help"])
            else:
                parser.add_argument(flag, type=kind, default=f.default, help=f.metadata["help"])

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> "EngineArgs":
        return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})


def cli_type(f) -> type:
    """The argparse type of a dataclass field (bool -> a store_true flag)."""
    t = f.type if isinstance(f.type, str) else str(f.type)
    for name, kind in (("bool", bool), ("int", int), ("float", float)):
        if name in t:
            return kind
    return str
