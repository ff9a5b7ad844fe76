"""What head-signal routers cost on the torch backend: the lm_head for every row.

A hidden-only router decides before the SLM's lm_head, so rows routed to the LLM skip
it (early exit). A 'hidden+head' router needs the head's statistics (top probability,
margin, entropy) for every row, so the SLM's lm_head runs for rows the LLM then redoes.
The extra work is one SLM head per LLM-routed token; it is largest when every token
goes to the LLM, so this measures both routers at τ = 1 (all LLM) and τ = 0 (all SLM)
on random-weight Qwen2-shaped models (SLM ~10M with a 151K vocabulary, LLM ~100M),
interleaved, median of --repeats runs, at batch 1 and --batch. At an LLM share s the
overhead per token is about s x (the τ = 1 difference).

  .venv/bin/python benchmarks/signal_router_cost.py [--repeats 5] [--batch 16]
"""
import argparse
import os
import sys
import tempfile

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(__file__))
from common import add_pair_args, add_run_args, build_pair, interleaved_medians, make_router, median, timed  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pair_args(ap)
    ap.add_argument("--batch", type=int, default=16)
    add_run_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoConfig

    from citer import Engine, SamplingParams

    slm_path, llm_path = build_pair(args)
    hidden = AutoConfig.from_pretrained(slm_path).hidden_size
    engines = {f: Engine(slm_path, llm_path, make_router(hidden, tempfile.mkdtemp(prefix="citer-router-"), f),
                         backend="torch", max_model_len=512, num_blocks=64 * args.batch)
               for f in ("hidden", "hidden+head")}
    gen = torch.Generator().manual_seed(0)
    n = args.new_tokens
    fns = {}
    for batch in (1, args.batch):
        prompts = [torch.randint(3, 30000, (args.prompt_len,), generator=gen).tolist() for _ in range(batch)]
        for tau in (0.0, 1.0):
            for f, engine in engines.items():
                def run(engine=engine, prompts=prompts, tau=tau):
                    outs = engine.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True, policy="router",
                                                                   threshold=tau))
                    assert all(len(o.token_ids) == n for o in outs)
                fns[(batch, tau, f)] = lambda run=run: timed(run)
    for fn in fns.values():
        fn()
    with tqdm(total=len(fns) * args.repeats, desc="signal-router cost") as bar:
        res = interleaved_medians(fns, args.repeats, bar)
    t = {k: median(v) for k, v in res.items()}
    print(f"\nSLM {args.slm}, LLM {args.llm}; torch backend, prompt {args.prompt_len}, {n} new tokens, greedy fp32, "
          f"{args.threads} threads, median of {args.repeats} interleaved runs")
    print(f"{'batch':>5} {'τ (LLM share)':>14} {'hidden ms/tok':>14} {'hidden+head ms/tok':>19} {'ratio':>6}")
    for batch in (1, args.batch):
        for tau in (0.0, 1.0):
            a, b = (t[(batch, tau, f)] / (n * batch) * 1e3 for f in ("hidden", "hidden+head"))
            print(f"{batch:>5} {f'{tau:g} ({tau:.0%})':>14} {a:>14.3f} {b:>19.3f} {b / a:>6.3f}")


if __name__ == "__main__":
    main()
