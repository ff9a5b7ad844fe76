"""What weight-only int8 costs in accuracy on real checkpoints: each model teacher-forced over
the same code (HumanEval prompts with their reference solutions) in bfloat16 and in int8
(bfloat16 activations), and compared position by position: how often the greedy token is
the same, and how far the log-probability of the reference's next token moves.

    .venv/bin/python benchmarks/int8_accuracy.py [--models 0.5b 1.5b] [-n 40] [--json out.json]
"""
import argparse
import json
import os

import torch

REAL = "~/.cache/citer/real-pair/hf/qwen2.5-coder-{}-instruct"
DATA = "~/.cache/citer/data/humaneval.jsonl"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["0.5b", "1.5b"])
    ap.add_argument("-n", type=int, default=40)
    ap.add_argument("--json")
    args = ap.parse_args()
    from citer import Engine
    from citer.research.training.forcing import Forcer

    with open(os.path.expanduser(DATA)) as f:
        recs = [json.loads(line) for line in f][:args.n]
    out = {}
    for size in args.models:
        path = os.path.expanduser(REAL.format(size))
        runs = {}
        for q in (None, "int8"):
            e = Engine(slm=path, dtype="bfloat16", quantization=q, max_model_len=1024, num_blocks=64)
            tok = e.tokenizer
            seqs = [tok(r["prompt"] + r.get("reference", "")).input_ids for r in recs]
            starts = [len(tok(r["prompt"]).input_ids) for r in recs]
            runs[q] = Forcer.from_engine(e).run(seqs, starts=starts)
            del e
        agree = total = 0
        dlogp = []
        for a, b in zip(runs[None], runs["int8"]):
            n = len(a.slm_pred) - 1  # the last position predicts nothing
            agree += int((a.slm_pred[:n] == b.slm_pred[:n]).sum())
            total += n
            dlogp.append((a.slm_logp_next[:n] - b.slm_logp_next[:n]).abs())
        d = torch.cat(dlogp)
        out[size] = {"positions": total, "greedy_agreement": agree / total, "mean_abs_dlogp": float(d.mean()),
                     "p99_abs_dlogp": float(torch.quantile(d, 0.99)), "max_abs_dlogp": float(d.max())}
        print(f"Qwen2.5-Coder-{size}: int8 vs bf16 over {total} positions: greedy token equal at "
              f"{100 * agree / total:.2f}%, |d logprob of the next token| mean {out[size]['mean_abs_dlogp']:.4f}, "
              f"p99 {out[size]['p99_abs_dlogp']:.3f}, max {out[size]['max_abs_dlogp']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
