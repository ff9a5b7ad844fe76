"""Tensor parallelism: decode step time against TP size, and what it would take on big GPUs.

On this machine (CPU, gloo: the mechanism, not a speed-up; two ranks share 2 cores): a
random-weight model at a real shape decoded by citer's LLM alone at TP 1 and 2, ms per
token at batch 1 and 8, the same tokens checked; the cost of one gloo all-reduce of a
decode step's activations ([batch, hidden] float32), timed in a 2-process group. On a
machine with several GPUs (NCCL), the same at TP 1, 2, 4, 8 up to the GPUs present.
Always: the cost model's paper numbers for Qwen2-72B at TP 1/2/4/8 on NVLink and PCIe
(all-reduce bytes and time per decode step, step time; citer.research.cost_model).

    .venv/bin/python benchmarks/tensor_parallel.py [--shape qwen2-100m] [--json out.json]
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import build_random_qwen2  # noqa: E402


def _allreduce_worker(rank, world, port, numel, iters, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    x = torch.randn(numel)
    for _ in range(10):
        dist.all_reduce(x)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(x)
    dt = (time.perf_counter() - t0) / iters
    if rank == 0:
        out.put(dt)
    dist.destroy_process_group()


def allreduce_seconds(numel: int, world: int = 2, iters: int = 200) -> float:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_allreduce_worker, args=(r, world, port, numel, iters, q)) for r in range(world)]
    for p in procs:
        p.start()
    dt = q.get(timeout=300)
    for p in procs:
        p.join(60)
    return dt


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen2-100m")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    from citer import Engine, SamplingParams
    from citer.research.cost_model import DEVICES, QWEN2, tp_table

    cuda = torch.cuda.is_available()
    sizes = [1] + [t for t in (2, 4, 8) if (torch.cuda.device_count() if cuda else 2) >= t]
    root = os.environ.get("CITER_BENCH_DIR") or os.path.join(tempfile.gettempdir(), "citer-bench-models")
    path = build_random_qwen2(args.shape, root, dtype=torch.bfloat16 if cuda else torch.float32,
                              device="cuda" if cuda else "cpu")
    prompt = list(range(5, 37))
    out = {"device": torch.cuda.get_device_name() if cuda else "cpu (gloo)", "shape": args.shape, "steps": {}}
    ref = None
    for tp in sizes:
        e = Engine(llm=path, device="cuda" if cuda else "cpu", dtype="bfloat16" if cuda else "float32",
                   llm_tensor_parallel_size=tp, max_model_len=128, max_num_seqs=8, num_blocks=128)
        try:
            row = {}
            for b in (1, 8):
                params = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True, policy="llm")
                e.generate([prompt] * b, params)  # warm-up
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    outs = e.generate([prompt] * b, params)
                    times.append((time.perf_counter() - t0) / args.new_tokens * 1e3)
                row[f"batch{b}_ms_per_step"] = statistics.median(times)
                if b == 1:
                    ref = ref or outs[0].token_ids
                    assert outs[0].token_ids == ref, f"TP {tp} changed the greedy tokens"
            out["steps"][tp] = row
        finally:
            e.close()
    from common import QWEN2_SHAPES

    hidden, layers = QWEN2_SHAPES[args.shape]["hidden_size"], QWEN2_SHAPES[args.shape]["num_hidden_layers"]
    if not cuda:
        out["gloo_allreduce_ms"] = {b: 1e3 * allreduce_seconds(b * hidden) for b in (1, 8)}
    out["paper_qwen2_72b"] = {d: tp_table(QWEN2["72b"], DEVICES[d]) for d in ("H100", "H200")}
    print(f"\n{args.shape} on {out['device']}: ms per decode step (greedy tokens equal at every TP size)")
    for tp, row in out["steps"].items():
        print(f"  TP {tp}: " + ", ".join(f"{k.split('_')[0]} {v:.1f} ms" for k, v in row.items()))
    if "gloo_allreduce_ms" in out:
        print("  one gloo all-reduce of a decode step's activations: " + ", ".join(
            f"batch {b}: {v:.3f} ms" for b, v in out["gloo_allreduce_ms"].items())
            + f"; a step makes 2 per layer plus one for the embedding and a head all-gather: {2 * layers + 2} "
              f"at {layers} layers")
    print("\nQwen2-72B decode, batch 1, context 1024, bf16 (cost model; all-reduce bytes per step and time):")
    print(f"{'GPU':<6} {'TP':>3} {'all-reduce KB':>14} {'NVLink comm ms':>15} {'step ms':>8} {'PCIe comm ms':>13} "
          f"{'step ms':>8}")
    for d, t in out["paper_qwen2_72b"].items():
        for tp, r in t.items():
            print(f"{d:<6} {tp:>3} {r['allreduce_bytes_per_step'] / 1024:>14.0f} {r['comm_ms_nvlink']:>15.2f} "
                  f"{r['step_ms_nvlink']:>8.2f} {r['comm_ms_pcie']:>13.2f} {r['step_ms_pcie']:>8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    main()
