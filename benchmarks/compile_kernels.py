"""`benchmarks/kernel_bench.py --compile-only`: ahead-of-time compilation for a GPU target, no GPU needed.

Every kernel wrapper is called on meta tensors at the benchmark shapes with each
@triton.jit kernel it launches replaced by a recorder (split counts as a 132-SM H100
would get them); each distinct launch is then compiled for sm_<arch> the way the JIT
would specialise it, and Triton's own ptxas reports registers, spills and shared memory.
"""
import os
import re
import subprocess
import tempfile

import torch

from kernel_bench import BLOCK_SIZE, DT, INTERMEDIATE, SHAPES, head_inputs, paged_inputs


def _jit_functions(modules):
    from triton.runtime.jit import JITFunction

    return [(m, name, obj) for m in modules for name, obj in vars(m).items() if isinstance(obj, JITFunction)]


def capture_launches(fn, *args, sm_count=132, **kwargs):
    """Call a kernel wrapper on meta tensors with every @triton.jit kernel it launches
    replaced by a recorder -> [(kernel, positional args, keyword args)] in launch order.
    Split counts are those of a GPU with sm_count SMs (132: H100 SXM)."""
    from citer.kernels import kv_store, linear_triton, paged_attention, rmsnorm, routed_head

    launches, patched = [], _jit_functions([kv_store, linear_triton, paged_attention, rmsnorm, routed_head])
    splits = paged_attention.decode_num_splits
    patched += [(paged_attention, "decode_num_splits", splits), (routed_head, "_default_v_splits",
                                                                routed_head._default_v_splits),
                (linear_triton, "sm_count", linear_triton.sm_count)]

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *a, **kw: launches.append((self.kernel, a, kw))

    try:
        for m, name, obj in patched:
            setattr(m, name, Recorder(obj))
        paged_attention.decode_num_splits = lambda n, h, dev, sm=None: splits(n, h, torch.device("cuda"), sm_count)
        routed_head._default_v_splits = lambda dev: 4 * sm_count
        linear_triton.sm_count = lambda dev: sm_count
        fn(*args, **kwargs)
    finally:
        for m, name, obj in patched:
            setattr(m, name, obj)
    return launches


_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
          torch.int64: "i64", torch.uint8: "u8", torch.int8: "i8"}


def aot_compile(kernel, args, kwargs, arch: int):
    """Compile one recorded launch for sm_<arch> the way the JIT would specialise it (16-byte
    aligned pointers, ints divisible by 16 marked so) -> (compiled kernel, ptxas -v summary)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    values = dict(zip(kernel.arg_names, args))
    values.update(kwargs)
    constexpr_names = {p.name for p in kernel.params if p.is_constexpr}
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        v = values[name]
        if name in constexpr_names or v is None:
            sig[name], consts[name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + _TYPES[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            sig[name] = "i64" if not -2 ** 31 <= v < 2 ** 31 else "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: cannot type argument {name}={v!r}")
    compiled = triton.compile(ASTSource(kernel, sig, consts, attrs), target=GPUTarget("cuda", arch, 32),
                              options=options)
    return compiled, _ptxas_stats(compiled.asm["ptx"], arch)


def _ptxas_stats(ptx: str, arch: int) -> dict:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(arch).path
    except Exception:  # pragma: no cover - other Triton layouts
        import triton

        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        suffix = "a" if arch >= 90 else ""
        res = subprocess.run([ptxas, f"-arch=sm_{arch}{suffix}", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    text = res.stderr + res.stdout
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed:\n{text}")

    def grab(pattern):
        m = re.search(pattern, text)
        return int(m.group(1)) if m else 0

    return dict(regs=grab(r"Used (\d+) registers"), spill_stores=grab(r"(\d+) bytes spill stores"),
                spill_loads=grab(r"(\d+) bytes spill loads"))


def engine_step_launches(quick: bool = False):
    """(label, recorded launches) for every kernel at the benchmark shapes, on meta tensors,
    with the split counts a 132-SM H100 would get."""
    from citer.kernels.kv_store import store_kvcache_triton
    from citer.kernels.linear_triton import linear_int8_triton
    from citer.kernels.paged_attention import paged_attention_triton
    from citer.kernels.rmsnorm import rms_norm_triton
    from citer.kernels.routed_head import routed_head_triton

    out = []
    models = list(SHAPES.items())[-1:] if quick else list(SHAPES.items())
    for name, (hidden, hq, hkv, d, vocab) in models:
        x = torch.empty(8, hidden, device="meta", dtype=DT)
        out.append((f"{name} rmsnorm+residual", capture_launches(rms_norm_triton, x, x[0], 1e-6, x)))
        k = torch.empty(8, hkv, d, device="meta", dtype=DT)
        cache = torch.empty(64, BLOCK_SIZE, hkv, d, device="meta", dtype=DT)
        slots = torch.empty(8, dtype=torch.int64, device="meta")
        out.append((f"{name} kv store", capture_launches(store_kvcache_triton, k, k, cache, cache, slots)))
        for batch in ((1,) if quick else (1, 8)):
            args = paged_inputs(hq, hkv, d, [1] * batch, [4096] * batch, "meta")
            out.append((f"{name} decode attn b{batch}", capture_launches(paged_attention_triton, *args)))
        args = paged_inputs(hq, hkv, d, [8] * 8, [4096] * 8, "meta")
        out.append((f"{name} catch-up attn b8 q8", capture_launches(paged_attention_triton, *args)))
        args = paged_inputs(hq, hkv, d, [512, 100], [512, 1000], "meta")
        out.append((f"{name} prefill attn q512", capture_launches(paged_attention_triton, *args)))
        for batch in ((1, 32) if quick else (1, 8, 32)):
            label = f"{name} routed head b{batch} +router"
            out.append((label, capture_launches(routed_head_triton, *head_inputs(hidden, vocab, batch, "meta"))))
        # quantization="int8": the MLP's down projection (K = the intermediate size), decode and a
        # catch-up (prefills past MAX_KERNEL_ROWS go to cuBLAS), bf16 and float32 activations
        q = torch.empty(hidden, INTERMEDIATE[name], device="meta", dtype=torch.int8)
        scale = torch.empty(hidden, device="meta")
        for dtype in (DT, torch.float32):
            for rows in ((1, 64) if quick else (1, 8, 32, 64)):
                x = torch.empty(rows, INTERMEDIATE[name], device="meta", dtype=dtype)
                out.append((f"{name} int8 linear m{rows} {_TYPES[dtype]}",
                            capture_launches(linear_int8_triton, x, q, scale, torch.empty(hidden, device="meta"))))
    return out


def compile_only(arch: int, quick: bool) -> int:
    os.environ.pop("TRITON_INTERPRET", None)  # compile for real (the kernels' module reads it at launch)
    import triton

    print(f"triton {triton.__version__}: compiling every kernel launch for sm_{arch} (no GPU needed)")
    rows, seen, bad = [], set(), 0
    for label, launches in engine_step_launches(quick):
        for kernel, args, kwargs in launches:
            key = (kernel.__name__, tuple(sorted((k, v) for k, v in kwargs.items() if not isinstance(v, torch.Tensor))))
            if key in seen:
                continue
            seen.add(key)
            compiled, stats = aot_compile(kernel, args, dict(kwargs), arch)
            spills = stats["spill_stores"] + stats["spill_loads"]
            bad += spills > 0
            rows.append((label, kernel.__name__, stats["regs"], spills, compiled.metadata.shared,
                         compiled.metadata.num_warps))
    print(f"\n{'launch':<34} {'kernel':<28} {'regs':>5} {'spill B':>8} {'smem B':>8} {'warps':>5}")
    for label, kname, regs, spills, smem, warps in rows:
        print(f"{label:<34} {kname:<28} {regs:>5} {spills:>8} {smem:>8} {warps:>5}")
    print(f"\n{len(rows)} kernel variants compiled for sm_{arch}; {bad} with register spills")
    return 1 if bad else 0
