"""Decoder layers in one call of the CPU extension against the per-op Python layers, side by side.

The same engine and weights, the model's ops switched between the two paths run by run
(kernels/decoder_layer.py: `cpu_layers` on or off), batch 1 by default, greedy, ms per
decode step (prefill included, as generate pays it), medians of interleaved runs; the
tokens of the two paths are checked equal first. Models: random-weight Qwen2 shapes by
name (benchmarks/common.py: qwen2-10m, the routed benchmarks' SLM; qwen2-0.5b ...) or
checkpoint folders.

    .venv/bin/python benchmarks/cpu_layer.py [--models qwen2-10m DIR ...] [--dtypes float32 bfloat16] [--batch 1]
"""
import argparse
import dataclasses
import os
import sys

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(__file__))
from common import build_random_qwen2, interleaved_medians, median, scratch_dir, timed  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="+", default=["qwen2-10m"], help="random-weight shape names or folders")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from citer import Engine, SamplingParams

    rows = []
    for name in args.models:
        path = os.path.expanduser(name) if os.path.isdir(os.path.expanduser(name)) \
            else build_random_qwen2(name, scratch_dir())
        for dtype in args.dtypes:
            engine = Engine(llm=path, dtype=dtype, max_model_len=args.prompt_len + args.new_tokens + 8,
                            num_blocks=64 * args.batch, max_num_seqs=args.batch, cpu_threads=args.threads)
            runner = engine.core.llm
            paths = {"one call": runner.ops, "per op": dataclasses.replace(runner.ops, cpu_layers=False)}
            prompts = [[3 + (7 * i + j) % 500 for j in range(args.prompt_len)] for i in range(args.batch)]
            params = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True, policy="llm")

            def run(ops):
                runner.ops = ops
                return [o.token_ids for o in engine.generate(prompts, params)]

            tokens = {k: run(ops) for k, ops in paths.items()}  # also the warm-up
            if tokens["one call"] != tokens["per op"]:
                raise SystemExit(f"{name} {dtype}: the two paths' tokens differ")
            fns = {k: (lambda ops=ops: timed(lambda: run(ops))) for k, ops in paths.items()}
            with tqdm(total=2 * args.repeats, desc=f"{os.path.basename(name)} {dtype}") as bar:
                t = {k: median(v) / args.new_tokens * 1e3 for k, v in interleaved_medians(fns, args.repeats, bar).items()}
            rows.append((os.path.basename(name), dtype, t["per op"], t["one call"]))
            del engine, runner

    print(f"\nbatch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy, {args.threads} threads, "
          f"median of {args.repeats} interleaved runs; tokens of both paths equal")
    print(f"{'model':<30} {'dtype':<9} {'per-op ms/step':>15} {'one-call ms/step':>17} {'ratio':>6}")
    for name, dtype, per_op, one in rows:
        print(f"{name:<30} {dtype:<9} {per_op:>15.2f} {one:>17.2f} {one / per_op:>6.3f}")


if __name__ == "__main__":
    main()
