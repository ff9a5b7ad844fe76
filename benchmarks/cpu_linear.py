"""The CPU few-row linear (csrc/cpu_linear.inc) against torch's GEMM, the path a call takes
past it: achieved weight bandwidth (GB/s) per shape, dtype and row count, weights cycled
through 256 MB of copies so that, as in a decode step, they do not sit in the core's
caches (a last-level cache as large as this VM's reported 300 MB can still hold part). For int8 weights the
GEMM side is citer's linear_int8_gemm (chunks dequantized in cache into torch's GEMM).
Medians of interleaved calls; a table last. The row count where the GEMM wins is where
kernels/linear.py hands calls over.

    .venv/bin/python benchmarks/cpu_linear.py [--rows 1 4 16] [--shapes small-llama-gate/up ...] [--threads 2]
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from citer.kernels import cpu_ext
from citer.kernels.linear import quantize_int8

SHAPES = {  # name: (N, K) as [out, in]
    "small-llama-gate/up": (3072, 576),
    "small-llama-down": (576, 1536),
    "small-llama-lm_head": (49152, 576),
    "qwen2-0.5b-gate/up": (9728, 896),
    "qwen2-0.5b-down": (896, 4864),
    "qwen2-1.5b-gate/up": (17920, 1536),
}
COPIES_BYTES = 256 << 20  # cycle through at least this many weight bytes (past the L3)


def weights(n: int, k: int, kind: str, copies: int):
    w = torch.randn(n, k)
    if kind == "int8":
        return [quantize_int8(w) for _ in range(copies)], torch.bfloat16
    dtype = torch.float32 if kind == "float32" else torch.bfloat16
    return [(w.to(dtype).clone(), None) for _ in range(copies)], dtype


def time_calls(fn, ws, x, rounds: int) -> float:
    ts = []
    for _ in range(rounds):
        for w, s in ws:
            t0 = time.perf_counter()
            fn(x, w, s)
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--kinds", nargs="+", default=["float32", "bfloat16", "int8"])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not cpu_ext.AVAILABLE:
        raise SystemExit("this CPU has no AVX-512 BF16 (or citer._cpu_kernels is not built): nothing to time")
    torch.set_num_threads(args.threads)
    kernel = lambda x, w, s: cpu_ext.ext.linear(x, w, s, None)  # noqa: E731
    torch_ = lambda x, w, s: F.linear(x, w) if s is None else cpu_ext.ext.linear_int8_gemm(x, w, s)  # noqa: E731
    table = []
    for name in args.shapes:
        n, k = SHAPES[name]
        for kind in args.kinds:
            nbytes = n * k * (4 if kind == "float32" else 2 if kind == "bfloat16" else 1)
            ws, xdtype = weights(n, k, kind, max(2, COPIES_BYTES // nbytes))
            for m in args.rows:
                x = torch.randn(m, k).to(xdtype)
                t_k, t_t = (time_calls(f, ws, x, args.rounds) for f in (kernel, torch_))
                table.append((name, kind, m, nbytes / t_k / 1e9, nbytes / t_t / 1e9, t_t / t_k))
                gk, gt = table[-1][3:5]
                print(f"{name:22s} {kind:9s} rows {m:2d}: kernel {gk:6.1f} GB/s, GEMM {gt:6.1f} GB/s", flush=True)
            del ws
    print(f"\n{args.threads} threads; weight GB/s of citer's few-row kernel and of the GEMM path")
    print(f"{'shape':22s} {'dtype':9s} {'rows':>4s} {'kernel':>7s} {'GEMM':>7s} {'kernel speed-up':>15s}")
    for name, kind, m, gk, gt, r in table:
        print(f"{name:22s} {kind:9s} {m:4d} {gk:7.1f} {gt:7.1f} {r:15.2f}")


if __name__ == "__main__":
    main()
