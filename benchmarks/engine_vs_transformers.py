"""citer vs transformers `generate`, same random-weight model, batch 1, greedy.

Per-token decode time, median of several interleaved runs, ratio citer / transformers
(< 1 means citer is faster). Run: .venv/bin/python benchmarks/engine_vs_transformers.py
"""
import argparse
import os
import sys

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(__file__))
from common import add_run_args, build_random_qwen2, interleaved_medians, median, num_params, scratch_dir, timed  # noqa: E402


def bench_model(name: str, args) -> dict:
    from transformers import AutoModelForCausalLM

    from citer import Engine, SamplingParams

    path = build_random_qwen2(name, scratch_dir())
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    engine = Engine(path, device="cpu", dtype="float32", max_model_len=512, num_blocks=64)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 30000, (args.prompt_len,), generator=g).tolist()
    params = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True)

    def run_hf():
        with torch.inference_mode():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=args.new_tokens, do_sample=False,
                              min_new_tokens=args.new_tokens, pad_token_id=0)
        assert out.shape[1] == args.prompt_len + args.new_tokens

    def run_citer():
        out = engine.generate([prompt], params)[0]
        assert len(out.token_ids) == args.new_tokens

    # each run's time includes the prefill of a short prompt; per-token = total / new tokens
    fns = {"transformers": lambda: timed(run_hf), "citer": lambda: timed(run_citer)}
    for fn in fns.values():  # warm-up
        fn()
    with tqdm(total=args.repeats * 2, desc=name, leave=False) as bar:
        res = interleaved_medians(fns, args.repeats, bar)
    hf_ms = median(res["transformers"]) / args.new_tokens * 1e3
    citer_ms = median(res["citer"]) / args.new_tokens * 1e3
    # same greedy tokens, as a sanity check of what is being timed
    with torch.inference_mode():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8,
                          pad_token_id=0)[0, args.prompt_len:].tolist()
    same = engine.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))[0].token_ids == ref
    return dict(model=name, params_m=num_params(path) / 1e6, hf_ms=hf_ms, citer_ms=citer_ms,
                ratio=citer_ms / hf_ms, same_tokens=same)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="+", default=["qwen2-100m", "qwen2-tiny"])
    add_run_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [bench_model(m, args) for m in args.models]
    print(f"\nbatch 1, prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy, float32, "
          f"{args.threads} threads, median of {args.repeats} interleaved runs")
    print(f"{'model':<12} {'params':>8} {'transformers ms/tok':>20} {'citer ms/tok':>13} {'ratio':>7} {'same tokens':>12}")
    for r in rows:
        print(f"{r['model']:<12} {r['params_m']:>7.1f}M {r['hf_ms']:>20.2f} {r['citer_ms']:>13.2f} "
              f"{r['ratio']:>7.2f} {str(r['same_tokens']):>12}")


if __name__ == "__main__":
    main()
