"""Kernel benchmarks at real model shapes (Qwen2-1.5B, Qwen2-7B), bf16 (and int8 weights).

On a GPU: triton.testing.do_bench for every kernel; achieved bytes/s against the device's
own measured device-to-device copy bandwidth; decode attention at 4k/16k/32k contexts
(batch 1 and 8), routed head at batch 1/8 (vs the torch reference path, which builds
[B, vocab] logits), flash-attn's paged decode where it is installed, the weight-only int8
linear against bf16 on cuBLAS and the dequantizing reference. Prints a table last.

  python benchmarks/kernel_bench.py                    # GPU benchmark; on CPU: a note, exit 0
  python benchmarks/kernel_bench.py --compile-only     # no GPU needed: compile every kernel
      exactly as the wrappers launch it at the real shapes, for sm_90 (H100/H200), with
      Triton's own ptxas; report registers, spills and shared memory per kernel
      (benchmarks/compile_kernels.py)
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SHAPES = {  # hidden, q heads, kv heads, head_dim, vocab
    "qwen2-1.5b": (1536, 12, 2, 128, 151936),
    "qwen2-7b": (3584, 28, 4, 128, 152064),
}
INTERMEDIATE = {"qwen2-1.5b": 8960, "qwen2-7b": 18944}  # the SHAPES models' MLP widths (int8 linear launches)
DT = torch.bfloat16
BLOCK_SIZE = 16


# ---------------------------------------------------------------------------------------
# The launches of one engine step, per model shape (shared by the GPU run and --compile-only)
# ---------------------------------------------------------------------------------------
def head_inputs(hidden, vocab, batch, device, router=True, sampling=False):
    lm = torch.empty(vocab, hidden, device=device, dtype=DT)
    nw = torch.empty(hidden, device=device, dtype=DT)
    hs = torch.empty(batch, hidden, device=device, dtype=DT)
    r = None
    if router:
        r = (torch.empty(2 * hidden, hidden, device=device), torch.empty(2 * hidden, device=device),
             torch.empty(2 * hidden, device=device), torch.empty((), device=device))
    temp = torch.full((batch,), 0.7 if sampling else 0.0, device=device)
    seeds = torch.zeros(batch, dtype=torch.int64, device=device)
    return hs, nw, 1e-6, lm, r, temp, seeds


def paged_inputs(hq, hkv, d, q_lens, ctx, device, init=torch.empty):
    """Caches holding exactly the batch's contexts, with permuted block tables."""
    batch = len(ctx)
    pages = [-(-c // BLOCK_SIZE) for c in ctx]
    nb = sum(pages)
    kc = init(nb, BLOCK_SIZE, hkv, d, device=device, dtype=DT)
    vc = init(nb, BLOCK_SIZE, hkv, d, device=device, dtype=DT)
    perm = torch.randperm(nb) if device != "meta" else torch.arange(nb)
    tables = torch.zeros(batch, max(pages), dtype=torch.int32)
    start = 0
    for b, n in enumerate(pages):
        tables[b, :n] = perm[start:start + n].int()
        start += n
    q = init(sum(q_lens), hq, d, device=device, dtype=DT)
    qsl = torch.zeros(batch + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(q_lens).cumsum(0)
    return (q, kc, vc, tables.to(device), torch.tensor(ctx, dtype=torch.int32, device=device), qsl.to(device),
            d ** -0.5, max(q_lens), max(ctx))


# ---------------------------------------------------------------------------------------
# GPU timing
# ---------------------------------------------------------------------------------------
def copy_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy (read + write)."""
    import triton.testing

    x = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=25, rep=200)
    return 2 * x.numel() / (ms * 1e-3)


def gpu_benchmark() -> int:
    import triton.testing

    from citer.kernels.kv_store import store_kvcache_triton
    from citer.kernels.paged_attention import paged_attention_triton
    from citer.kernels.rmsnorm import rms_norm_triton
    from citer.kernels.routed_head import routed_head_ref, routed_head_triton

    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        flash_attn_with_kvcache = None

    def filled(head_args):
        hs, nw, eps, lm, router, temp, seeds = head_args
        hs.normal_()
        nw.fill_(1.0)
        lm.normal_(std=0.02)
        for t in router or ():
            t.normal_(std=0.02)
        return hs, nw, eps, lm, router, temp, seeds

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=100)

    bw = copy_bandwidth()
    rows = []  # (model, kernel, shape, ms, bytes, flops)
    dev = "cuda"
    for name, (hidden, hq, hkv, d, vocab) in SHAPES.items():
        # routed head: norm + lm_head + argmax/sample + router, vs the reference (full logits)
        for batch in (1, 8):
            for with_router in (False, True):
                args = filled(head_inputs(hidden, vocab, batch, dev, router=with_router))
                nbytes = args[3].numel() * 2 + (sum(t.numel() * 4 for t in args[4]) if with_router else 0)
                tag = " +router" if with_router else ""
                rows.append((name, f"routed head{tag}", f"b{batch}", bench(lambda: routed_head_triton(*args)),
                             nbytes, 0))
                if with_router:
                    rows.append((name, f"torch ref head{tag}", f"b{batch}", bench(lambda: routed_head_ref(*args)),
                                 nbytes, 0))
            sargs = filled(head_inputs(hidden, vocab, batch, dev, router=False, sampling=True))
            rows.append((name, "routed head, sampling", f"b{batch}", bench(lambda: routed_head_triton(*sargs)),
                         sargs[3].numel() * 2, 0))
            args = sargs = None  # frees the GPU memory before the next shape
        # RMSNorm with the residual add
        for t in (1, 64):
            x = torch.randn(t, hidden, device=dev, dtype=DT)
            r = torch.randn_like(x)
            w = torch.ones(hidden, device=dev, dtype=DT)
            rows.append((name, "rmsnorm+residual", f"t{t}", bench(lambda: rms_norm_triton(x, w, 1e-6, r)),
                         4 * x.numel() * 2, 0))
        # KV store
        for t in (8, 2048):
            k = torch.randn(t, hkv, d, device=dev, dtype=DT)
            cache = torch.zeros(t // BLOCK_SIZE + 8, BLOCK_SIZE, hkv, d, device=dev, dtype=DT)
            cache2 = torch.zeros_like(cache)
            slots = torch.randperm(cache.shape[0] * BLOCK_SIZE, device=dev)[:t]
            rows.append((name, "kv store", f"t{t}", bench(lambda: store_kvcache_triton(k, k, cache, cache2, slots)),
                         4 * k.numel() * 2, 0))
        # decode attention, split-KV, long contexts
        for ctx in (4096, 16384, 32768):
            for batch in (1, 8):
                args = paged_inputs(hq, hkv, d, [1] * batch, [ctx] * batch, dev, init=torch.randn)
                kv_bytes = 2 * args[1].numel() * 2
                rows.append((name, "decode attn (split-KV)", f"b{batch} ctx{ctx}",
                             bench(lambda: paged_attention_triton(*args)), kv_bytes, 4 * batch * ctx * hq * d))
                if flash_attn_with_kvcache is not None:  # its paged API needs pages of 256
                    q, kc, vc, _, seq_lens = args[:5]
                    kf, vf = kc.view(-1, 256, hkv, d), vc.view(-1, 256, hkv, d)
                    tf = torch.randperm(kf.shape[0], device=dev).int().view(batch, -1)
                    rows.append((name, "flash-attn paged decode", f"b{batch} ctx{ctx}",
                                 bench(lambda: flash_attn_with_kvcache(q[:, None], kf, vf, cache_seqlens=seq_lens,
                                                                       block_table=tf, softmax_scale=d ** -0.5)),
                                 kv_bytes, 4 * batch * ctx * hq * d))
                args = None  # frees the GPU memory
        # varlen attention: the LLM's catch-up (a few new tokens on a long context) and a prefill
        for q_len, ctx, batch in ((8, 4096, 8), (32, 4096, 8), (2048, 2048, 1)):
            args = paged_inputs(hq, hkv, d, [q_len] * batch, [ctx] * batch, dev, init=torch.randn)
            visible = batch * sum(ctx - q_len + i + 1 for i in range(q_len))
            rows.append((name, "varlen attn (catch-up/prefill)", f"b{batch} q{q_len} ctx{ctx}",
                         bench(lambda: paged_attention_triton(*args)), 2 * args[1].numel() * 2, 4 * visible * hq * d))
            args = None  # frees the GPU memory
        # weight-only int8 linear (quantization="int8"): the Triton kernel against bf16 weights on
        # cuBLAS and against the reference's dequantize-then-GEMM, at the MLP's down projection
        from citer.kernels.linear import linear_ref, quantize_int8
        from citer.kernels.linear_triton import linear_int8_triton

        inter = INTERMEDIATE[name]
        w = torch.randn(hidden, inter, device=dev, dtype=DT) * 0.02
        q, scale = quantize_int8(w)
        for m in (1, 8, 64):
            x = torch.randn(m, inter, device=dev, dtype=DT)
            rows.append((name, "int8 linear (Triton)", f"m{m} {hidden}x{inter}",
                         bench(lambda: linear_int8_triton(x, q, scale)), q.numel(), 2 * m * q.numel()))
            rows.append((name, "bf16 linear (cuBLAS)", f"m{m} {hidden}x{inter}",
                         bench(lambda: torch.nn.functional.linear(x, w)), w.numel() * 2, 2 * m * q.numel()))
            rows.append((name, "int8 linear (ref: dequant+GEMM)", f"m{m} {hidden}x{inter}",
                         bench(lambda: linear_ref(x, q, scale)), q.numel(), 2 * m * q.numel()))
        w = q = x = None
        torch.cuda.empty_cache()

    print(f"\ndevice: {torch.cuda.get_device_name()}; measured copy bandwidth {bw / 1e9:.0f} GB/s "
          "(bytes = compulsory bytes read + written; % = achieved / copy bandwidth)")
    print(f"{'model':<11} {'kernel':<31} {'shape':<18} {'us':>9} {'GB/s':>7} {'% copy':>7} {'TFLOP/s':>8}")
    for name, kernel, shape, ms, nbytes, flops in rows:
        s = ms * 1e-3
        tf = f"{flops / s / 1e12:8.1f}" if flops else f"{'':>8}"
        print(f"{name:<11} {kernel:<31} {shape:<18} {ms * 1e3:>9.1f} {nbytes / s / 1e9:>7.0f} "
              f"{100 * nbytes / s / bw:>6.0f}% {tf}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compile-only", action="store_true",
                    help="compile every kernel for --arch without a GPU and report registers/spills")
    ap.add_argument("--arch", type=int, default=90, help="compute capability for --compile-only (90 = H100/H200)")
    ap.add_argument("--quick", action="store_true", help="--compile-only on the 7B shapes only")
    opts = ap.parse_args(argv)
    if opts.compile_only:
        from compile_kernels import compile_only

        return compile_only(opts.arch, opts.quick)
    if not torch.cuda.is_available():
        print("benchmarks/kernel_bench.py times the Triton kernels on a CUDA device; none here, nothing to time.\n"
              "Without a GPU: `python benchmarks/kernel_bench.py --compile-only` compiles every kernel for sm_90 "
              "and reports registers and spills; the kernels' correctness runs under TRITON_INTERPRET=1 in "
              "tests/test_kernels.py.")
        return 0
    return gpu_benchmark()


if __name__ == "__main__":
    sys.exit(main())
