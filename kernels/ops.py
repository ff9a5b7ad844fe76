"""Backend dispatch for the hot-path ops.

`resolve_backend` picks "torch" (the references) or "triton" (the kernels) once, at
engine construction; `get_ops(backend)` returns the functions the model runner calls.
No global state: the engine holds its Ops and passes them down.

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

from .flash_attention import ATTENTION_CHOICES
from .kv_store import store_kvcache_ref
from .paged_attention import paged_attention_ref
from .rmsnorm import rms_norm_ref
from .routed_head import routed_head_ref

BACKENDS = ("torch", "triton")


@dataclass(frozen=True)
class Ops:
    name: str
    store_kvcache: Callable
    paged_attention: Callable
    rms_norm: Callable
    routed_head: Callable


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
    try:
        import triton  # noqa: F401
    except ImportError as e:  # pragma: no cover - triton is a pinned dependency
        raise RuntimeError("backend 'triton' requested but triton is not installed") from e
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"backend 'triton' on device {device} needs TRITON_INTERPRET=1 "
            "(set before citer is imported); Triton compiles only for CUDA devices"
        )


def get_ops(backend: str, attention: Optional[str] = None) -> Ops:
    """The backend's ops; attention="flash-attn" swaps in flash-attn's paged attention
    (check it with flash_attention.check_flash_attn first)."""
    if backend == "torch":
        ops = Ops("torch", store_kvcache_ref, paged_attention_ref, rms_norm_ref, routed_head_ref)
    elif backend == "triton":
        from . import triton_ops  # imported lazily: defining @triton.jit needs a driver

        ops = triton_ops.OPS
    else:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if attention is None:
        return ops
    if attention == "flash-attn":
        from .flash_attention import paged_attention_flash

        return replace(ops, paged_attention=paged_attention_flash)
    raise ValueError(f"unknown attention {attention!r}; choose one of {ATTENTION_CHOICES} or None")
