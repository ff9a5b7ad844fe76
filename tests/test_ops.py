"""The ops' dispatch: backend choice (CITER_BACKEND, the interpreter rule), the ops each
backend gives and their capability flags, flash-attn's swap; and, since the interpreter
does not compile, every kernel launch compiled for an H100 (sm_90) without a GPU."""
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():  # before anything defines @triton.jit kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from citer.kernels import ops as ops_mod  # noqa: E402
from citer.kernels.flash_attention import paged_attention_flash  # noqa: E402
from citer.kernels.kv_store import store_kvcache_cpu, store_kvcache_triton  # noqa: E402
from citer.kernels.ops import get_ops, resolve_backend  # noqa: E402
from citer.kernels.paged_attention import (SPLIT_KV_MAX_Q, paged_attention_cpu,  # noqa: E402
                                           paged_attention_splits, paged_attention_triton, split_kv_num_splits)
from citer.kernels.rmsnorm import rms_norm_cpu, rms_norm_triton  # noqa: E402
from citer.kernels.rotary import rotary_cpu, rotary_ref  # noqa: E402
from citer.kernels.routed_head import routed_head_triton  # noqa: E402

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "kernel_bench.py")


def test_resolve_backend(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("CITER_BACKEND", raising=False)
    assert resolve_backend(cpu) == "torch"
    assert resolve_backend(torch.device("cuda", 0)) == "triton"  # the default on CUDA (no check needed)
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend(cpu, "cuda-magic")
    monkeypatch.setenv("CITER_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend(cpu)
    monkeypatch.setenv("CITER_BACKEND", "torch")
    assert resolve_backend(cpu) == "torch"
    assert resolve_backend(cpu, "torch") == "torch"
    with pytest.raises(ValueError, match="unknown backend"):
        get_ops("cuda-magic")
    # the torch backend's attention is the CPU kernel wrapper (the reference where the
    # kernel is not built or the batch is not one it takes)
    assert get_ops("torch").paged_attention is paged_attention_cpu
    assert (get_ops("torch").rms_norm, get_ops("torch").rotary, get_ops("torch").store_kvcache) == (
        rms_norm_cpu, rotary_cpu, store_kvcache_cpu)


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend(cpu, "triton") == "triton"
    ops = get_ops("triton")
    assert ops.name == "triton"
    assert (ops.store_kvcache, ops.paged_attention, ops.rms_norm, ops.routed_head, ops.rotary) == (
        store_kvcache_triton, paged_attention_triton, rms_norm_triton, routed_head_triton, rotary_ref)
    monkeypatch.delenv("TRITON_INTERPRET")  # the check reads the environment at call time
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend(cpu, "triton")
    monkeypatch.setenv("CITER_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops_mod.resolve_backend(cpu)


def test_capability_flags_and_split_policy():
    """The engine asks the ops what they can do: the torch references neither fuse the head
    nor run in a CUDA graph and have no split knob; the Triton ops do all three, and the
    split count they report is the one paged_attention_triton picks; flash-attn keeps the
    Triton flags but has no split knob."""
    cpu = torch.device("cpu")
    ref = get_ops("torch")
    assert (ref.fused_head, ref.graph_safe) == (False, False) and ref.attention_splits(4, 1, 8, 2, cpu) is None
    tri = get_ops("triton")
    assert (tri.fused_head, tri.graph_safe) == (True, True)
    assert tri.attention_splits(4, 1, 8, 2, cpu) == split_kv_num_splits(4, 1, 8, 2, cpu)
    assert paged_attention_splits(4, SPLIT_KV_MAX_Q + 1, 8, 2, cpu) is None  # the prefill kernel: no splits
    flash = get_ops("triton", "flash-attn")
    assert flash.paged_attention is paged_attention_flash and flash.attention_splits(4, 1, 8, 2, cpu) is None
    assert flash.fused_head and flash.routed_head is tri.routed_head


# ---------------------------------------------------------------------------------------
# The interpreter does not compile: check that every launch also compiles for an H100
# ---------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the tests above compile the kernels for real")
def test_kernels_compile_for_sm90_without_register_spills():
    """Every kernel, launched exactly as its wrapper launches it at Qwen2-7B shapes (bf16),
    compiles for sm_90 with Triton's own ptxas and spills no registers."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, BENCH, "--compile-only", "--quick"], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "0 with register spills" in res.stdout
