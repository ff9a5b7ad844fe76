"""Routed throughput under load on this CPU, with and without deferred LLM calls.

The random-weight 10M/100M Qwen2 pair (benchmarks/common.py), greedy, prompts of 32 tokens,
48 new tokens, each request with its own seed, `--threads` threads (1 by default), medians
of interleaved rounds; per batch size, generated tokens/s of each policy as a ratio to
citer's LLM alone at the same batch: policy random at 15% and 5% (routed as before, and
with max_llm_wait / llm_batch_min), the SLM alone. Greedy outputs with deferral are checked
identical to those without. --dtype bfloat16 runs both models in bf16.

    .venv/bin/python benchmarks/routed_load.py [--batches 1 4 16 32] [--repeats 3] [--json out.json]
"""
import argparse
import json
import os
import sys
import time

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(__file__))
from common import add_pair_args, build_pair, interleaved_medians, median  # noqa: E402

DEFERRED = {"w4/b16": dict(max_llm_wait=4, llm_batch_min=16), "w8/b32": dict(max_llm_wait=8, llm_batch_min=32),
            "w16/b32": dict(max_llm_wait=16, llm_batch_min=32)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pair_args(ap)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.15, 0.05])
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from citer import Engine, SamplingParams

    slm, llm = build_pair(args)
    kw = dict(max_model_len=args.prompt_len + args.new_tokens + 8, max_num_seqs=max(args.batches), dtype=args.dtype)
    engines = {"now": Engine(slm, llm, **kw)}
    engines.update({name: Engine(slm, llm, **kw, **d) for name, d in DEFERRED.items()})
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 30000, (args.prompt_len,), generator=g).tolist() for _ in range(max(args.batches))]
    rows = []
    for b in tqdm(args.batches, desc="batch sizes"):
        ps = prompts[:b]

        def params(**p):
            return [SamplingParams(max_tokens=args.new_tokens, ignore_eos=True, seed=i, **p) for i in range(b)]

        runs = {"llm": ("now", params(policy="llm")), "slm": ("now", params(policy="slm"))}
        for f in args.fractions:
            for name in engines:
                runs[f"random {f:g} {name}"] = (name, params(policy="random", llm_fraction=f))
        outs = {}

        def timed(key):
            def fn():
                eng, pr = runs[key]
                t0 = time.perf_counter()
                o = engines[eng].generate(ps, pr)
                dt = time.perf_counter() - t0
                outs[key] = o
                return sum(len(x.token_ids) for x in o) / dt
            return fn

        fns = {k: timed(k) for k in runs}
        for fn in fns.values():  # warm-up
            fn()
        res = {k: median(v) for k, v in interleaved_medians(fns, args.repeats).items()}
        differ = {}  # requests whose greedy tokens with deferral differ from those without
        for f in args.fractions:
            ref = [o.token_ids for o in outs[f"random {f:g} now"]]
            for name in DEFERRED:
                got = [o.token_ids for o in outs[f"random {f:g} {name}"]]
                differ[f"random {f:g} {name}"] = sum(a != r for a, r in zip(got, ref))
        if args.dtype == "float32":  # exact there: deferral changes when the LLM runs, never what it makes
            assert not any(differ.values()), f"deferral changed the outputs: {differ}"
        share = {f: sum(sum(o.from_llm) for o in outs[f"random {f:g} now"]) /
                 sum(len(o.token_ids) for o in outs[f"random {f:g} now"]) for f in args.fractions}
        rows.append({"batch": b, "tok_per_s": res, "llm_share": share, "requests_differing": differ})
    cols = [k for k in rows[0]["tok_per_s"] if k != "llm"]
    print(f"\n{args.slm}/{args.llm}, {args.dtype}, {args.threads} thread(s), prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, greedy, medians of {args.repeats}: throughput / citer LLM alone "
          + ("(outputs with deferral identical to without: checked)" if args.dtype == "float32" else
             "(bfloat16 rounds each op's output, and a catch-up's rounding depends on which rows share its "
             "matmuls, so greedy outputs with deferral may differ; requests differing per batch below)"))
    print("| batch | LLM alone tok/s | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for r in rows:
        t = r["tok_per_s"]
        print(f"| {r['batch']} | {t['llm']:.1f} | " + " | ".join(f"{t[c] / t['llm']:.2f}x" for c in cols) + " |")
    if args.dtype != "float32":
        for r in rows:
            print(f"batch {r['batch']}: requests whose greedy outputs with deferral differ: {r['requests_differing']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
