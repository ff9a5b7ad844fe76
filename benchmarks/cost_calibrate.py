"""Calibrate the GPU step-cost model (citer.research.cost_model): time real decode and
catch-up steps of random-weight models at real shapes and print model against measured.

Steps go through the engine's ModelRunner (CUDA graphs where a bucket fits, as in serving):
decode steps of 1..64 rows at contexts 128..4096, and catch-ups of 8 tokens per row. The
model uses the figures of the device it runs on (H100 or H200 by name, else H100's).
Part of `gpu_check.sh costmodel`; `--device cpu --shape qwen2-tiny` is the smoke test.

    python benchmarks/cost_calibrate.py [--shape qwen2-0.5b] [--json out.json]
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
from common import QWEN2_SHAPES, build_random_qwen2  # noqa: E402


def time_step(engine, runner, rows: int, new: int, context: int, repeats: int, sync) -> float:
    """Median seconds of one runner step over `rows` sequences, each computing `new` positions
    ending at `context`."""
    from citer import SamplingParams
    from citer.engine.head import head_spec

    bm = engine.block_manager
    seqs = []
    for _ in range(rows):
        s = engine.core.make_sequences(list(range(5, 5 + context)), SamplingParams(max_tokens=1, policy="llm"))[0]
        s.handle = bm.create_sequence()
        bm.append_slots(s.handle, context)
        seqs.append(s)
    spec = head_spec(seqs)
    times = []
    try:
        for r in range(repeats + 1):
            for s in seqs:
                s.num_computed[runner.name] = context - new
            sync()
            t0 = time.perf_counter()
            runner.run(seqs, spec)
            sync()
            if r:  # the first run warms up (and captures the bucket's graph)
                times.append(time.perf_counter() - t0)
    finally:
        for s in seqs:
            bm.free_sequence(s.handle)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen2-0.5b", choices=sorted(QWEN2_SHAPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 2048, 4096])
    ap.add_argument("--catchup", type=int, default=8, help="tokens per row of the catch-up steps")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    from citer import Engine
    from citer.research.cost_model import DEVICES, Shape, Step, step_time

    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    root = os.environ.get("CITER_BENCH_DIR") or os.path.join(tempfile.gettempdir(), "citer-bench-models")
    path = build_random_qwen2(args.shape, root, dtype=dtype, device=args.device if cuda else "cpu")
    max_ctx = max(args.contexts)
    engine = Engine(None, path, device=args.device, dtype=str(dtype).removeprefix("torch."),
                    max_model_len=max_ctx + 8, max_num_seqs=max(args.rows),
                    num_blocks=max(args.rows) * (-(-(max_ctx + 8) // 16)) + 16, max_graph_query_len=args.catchup)
    runner = engine.core.llm
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    device = DEVICES["H200"] if "H200" in gpu else DEVICES["H100"]
    c = QWEN2_SHAPES[args.shape]
    shape = Shape(args.shape, c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"],
                  c["num_key_value_heads"], c["intermediate_size"], c["vocab_size"], True)
    rows = []
    print(f"{args.shape} on {gpu} (model: {device.name} figures), graphs {'on' if cuda else 'off'}")
    print(f"{'kind':<9} {'rows':>5} {'context':>8} {'measured ms':>12} {'model ms':>9} {'model/measured':>15}")
    for kind, new in (("decode", 1), ("catch-up", args.catchup)):
        for r in args.rows:
            for ctx in args.contexts:
                measured = time_step(engine, runner, r, new, ctx, args.repeats, sync)
                modelled = step_time(shape, Step(tuple((new, ctx) for _ in range(r)), r), device,
                                     graphs=cuda and new <= args.catchup, dtype_bytes=2 if cuda else 4)
                rows.append(dict(kind=kind, rows=r, context=ctx, measured_ms=1e3 * measured, model_ms=1e3 * modelled))
                print(f"{kind:<9} {r:>5} {ctx:>8} {1e3 * measured:>12.3f} {1e3 * modelled:>9.3f} "
                      f"{modelled / measured:>15.2f}")
    ratios = [x["model_ms"] / x["measured_ms"] for x in rows]
    print(f"model / measured: median {statistics.median(ratios):.2f}, range {min(ratios):.2f}-{max(ratios):.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": args.shape, "gpu": gpu, "device_figures": device.name, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
