"""Backend dispatch for the hot-path ops.

`resolve_backend` picks "torch" (the references) or "triton" (the kernels) once, at
engine construction; `get_ops(backend)` returns the functions the model runner calls
and what they can do (capability flags), so the engine asks the ops, never the
backend's name. No global state: the engine holds its Ops and passes them down.

- CITER_BACKEND unset: "triton" on CUDA, "torch" elsewhere.
- CITER_BACKEND=triton forces the Triton kernels (on CPU only with TRITON_INTERPRET=1)
  and fails loudly when Triton cannot run; it never falls back silently.
- CITER_BACKEND=torch forces the references.
- Engine(attention="flash-attn") replaces the paged attention op with flash-attn's
  (CUDA, fp16/bf16, pages of a multiple of 256 tokens; kernels/flash_attention.py).
"""
import os
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

from . import cpu_ext
from .flash_attention import ATTENTION_CHOICES, paged_attention_flash
from .kv_store import store_kvcache_cpu, store_kvcache_triton
from .linear import linear_cpu
from .linear_triton import linear_triton
from .paged_attention import paged_attention_cpu, paged_attention_ref, paged_attention_splits, paged_attention_triton
from .rmsnorm import rms_norm_cpu, rms_norm_triton
from .rotary import rotary_cpu, rotary_ref
from .routed_head import routed_head_ref, routed_head_triton

BACKENDS = ("torch", "triton")


def no_splits(num_seqs: int, max_query_len: int, num_heads: int, num_kv_heads: int, device) -> None:
    """An attention op without a split-count knob."""
    return None


@dataclass(frozen=True)
class Ops:
    name: str
    store_kvcache: Callable
    paged_attention: Callable
    rms_norm: Callable
    routed_head: Callable
    linear: Callable  # (x [M, K], w [N, K] (float or int8), scale [N] | None, bias [N] | None) -> [M, N]
    rotary: Callable  # (q [T, Hq, D], k [T, Hkv, D], cos, sin [T, 1, D]) -> rotated (q, k)
    # (num_seqs, max_query_len, num_heads, num_kv_heads, device) -> the split count the
    # attention op picks for such a batch, or None (no such knob)
    attention_splits: Callable
    # routed_head streams the lm_head once with the router folded in and never builds
    # [B, vocab] logits: skipping its lm_head for some rows saves nothing
    fused_head: bool
    # no op synchronises with the host, so a model step can be captured in a CUDA graph
    graph_safe: bool
    # decode steps run each decoder layer in one call of the CPU extension where they fit it
    # (kernels/decoder_layer.py: the same kernels as these ops, without their per-op dispatch)
    cpu_layers: bool = False


TORCH_OPS = Ops("torch", store_kvcache_cpu, paged_attention_cpu, rms_norm_cpu, routed_head_ref, linear_cpu,
                rotary_cpu, no_splits, fused_head=False, graph_safe=False, cpu_layers=cpu_ext.AVAILABLE)
TRITON_OPS = Ops("triton", store_kvcache_triton, paged_attention_triton, rms_norm_triton, routed_head_triton,
                 linear_triton, rotary_ref, paged_attention_splits, fused_head=True, graph_safe=True)


def resolve_backend(device: torch.device, requested: Optional[str] = None) -> str:
    requested = requested or os.environ.get("CITER_BACKEND") or None
    if requested is None:
        return "triton" if device.type == "cuda" else "torch"
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; choose one of {BACKENDS}")
    if requested == "triton":
        _check_triton_runs(device)
    return requested


def _check_triton_runs(device: torch.device) -> None:
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"backend 'triton' on device {device} needs TRITON_INTERPRET=1 "
            "(set before citer is imported); Triton compiles only for CUDA devices"
        )


def get_ops(backend: str, attention: Optional[str] = None) -> Ops:
    """The backend's ops; attention="flash-attn" swaps in flash-attn's paged attention
    (check it with flash_attention.check_flash_attn first)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    ops = TORCH_OPS if backend == "torch" else TRITON_OPS
    if attention is None:
        return ops
    if attention == "flash-attn":
        return replace(ops, paged_attention=paged_attention_flash, attention_splits=no_splits, cpu_layers=False)
    raise ValueError(f"unknown attention {attention!r}; choose one of {ATTENTION_CHOICES} or None")
