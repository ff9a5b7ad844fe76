"""Kernel benchmarks on a GPU: triton.testing.do_bench, achieved bytes/s vs the device's
measured copy bandwidth, at real model shapes (Qwen2-1.5B, Qwen2-7B), bf16.

  python benchmarks/kernels.py          # prints a table last; exits 0 with a note on CPU
"""
import sys

import torch

SHAPES = {  # hidden, q heads, kv heads, head_dim, vocab
    "qwen2-1.5b": (1536, 12, 2, 128, 151936),
    "qwen2-7b": (3584, 28, 4, 128, 152064),
}


def copy_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy (read + write)."""
    import triton.testing

    x = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=25, rep=200)
    return 2 * x.numel() / (ms * 1e-3)


def main() -> int:
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA device (the kernels only compile for GPUs); nothing to time here")
        return 0
    import triton.testing

    from citer.kernels.paged_attention import paged_attention_triton
    from citer.kernels.rmsnorm import rms_norm_triton
    from citer.kernels.routed_head import routed_head_triton

    bw = copy_bandwidth()
    rows = []
    dt = torch.bfloat16
    for name, (hidden, hq, hkv, d, vocab) in SHAPES.items():
        lm = torch.randn(vocab, hidden, device="cuda", dtype=dt) * 0.02
        nw = torch.ones(hidden, device="cuda", dtype=dt)
        router = (torch.randn(2 * hidden, hidden, device="cuda") * 0.02, torch.zeros(2 * hidden, device="cuda"),
                  torch.randn(2 * hidden, device="cuda") * 0.02, torch.zeros((), device="cuda"))
        for batch in (1, 8):
            hs = torch.randn(batch, hidden, device="cuda", dtype=dt)
            temp = torch.zeros(batch, device="cuda")
            seeds = torch.zeros(batch, dtype=torch.int64, device="cuda")
            for with_router in (False, True):
                ms = triton.testing.do_bench(
                    lambda: routed_head_triton(hs, nw, 1e-6, lm, router if with_router else None, temp, seeds))
                nbytes = lm.numel() * 2 + (sum(t.numel() * 4 for t in router[:3]) if with_router else 0)
                rows.append((name, f"routed head b{batch}{' +router' if with_router else ''}", ms, nbytes / (ms * 1e-3)))
            ref_ms = triton.testing.do_bench(lambda: torch.argmax(hs @ lm.t(), -1))
            rows.append((name, f"torch matmul+argmax b{batch}", ref_ms, lm.numel() * 2 / (ref_ms * 1e-3)))
        x = torch.randn(64, hidden, device="cuda", dtype=dt)
        ms = triton.testing.do_bench(lambda: rms_norm_triton(x, nw, 1e-6, x))
        rows.append((name, "rmsnorm+residual t64", ms, 4 * x.numel() * 2 / (ms * 1e-3)))
        for ctx in (4096, 16384, 32768):
            for batch in (1, 8):
                bs = 16
                nb = batch * ctx // bs
                kc = torch.randn(nb, bs, hkv, d, device="cuda", dtype=dt)
                vc = torch.randn_like(kc)
                tables = torch.randperm(nb, device="cuda").view(batch, -1).int()
                q = torch.randn(batch, hq, d, device="cuda", dtype=dt)
                seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
                qsl = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
                ms = triton.testing.do_bench(
                    lambda: paged_attention_triton(q, kc, vc, tables, seq_lens, qsl, d ** -0.5, 1, ctx))
                rows.append((name, f"decode attn b{batch} ctx{ctx}", ms, 2 * kc.numel() * 2 / (ms * 1e-3)))
    print(f"\ndevice: {torch.cuda.get_device_name()}; measured copy bandwidth {bw / 1e9:.0f} GB/s")
    print(f"{'model':<11} {'kernel':<30} {'us':>9} {'GB/s':>8} {'% of copy':>9}")
    for name, kernel, ms, bps in rows:
        print(f"{name:<11} {kernel:<30} {ms * 1e3:>9.1f} {bps / 1e9:>8.0f} {100 * bps / bw:>8.0f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
