"""Report on a trained pair: held-out greedy accuracy of each model, and teacher-forced
per-token error rates on digits vs other tokens (where the SLM's mistakes sit).

  python -m citer.research.training.report --slm S --llm L [-n 500]
"""
import argparse
import os

import torch

from citer import Engine, SamplingParams
from citer.research.evaluate import run_point
from citer.research.tasks import get_task

from .forcing import Forcer
from .positions import reference_sequences


def token_error_rates(forcer: Forcer, tok, problems) -> dict:
    seqs, starts = reference_sequences(tok, problems)
    counts = {m: {"digit": [0, 0], "other": [0, 0]} for m in ("slm", "llm")}  # [errors, tokens]
    for seq, start, f in zip(seqs, starts, forcer.run(seqs)):
        slm_pred, llm_pred = f.slm_pred, f.llm_pred
        for t in range(start, len(seq)):
            kind = "digit" if tok.decode([seq[t]]).strip().isdigit() else "other"
            for m, pred in (("slm", slm_pred), ("llm", llm_pred)):
                counts[m][kind][0] += int(pred[t - 1] != seq[t])
                counts[m][kind][1] += 1
    out = {}
    for m, c in counts.items():
        errs = c["digit"][0] + c["other"][0]
        out[m] = {"digit_error_rate": c["digit"][0] / max(c["digit"][1], 1),
                  "other_error_rate": c["other"][0] / max(c["other"][1], 1),
                  "digit_share_of_errors": c["digit"][0] / max(errs, 1),
                  "digit_share_of_tokens": c["digit"][1] / max(c["digit"][1] + c["other"][1], 1)}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slm", required=True)
    ap.add_argument("--llm", required=True)
    ap.add_argument("--task", default="arith")
    ap.add_argument("-n", type=int, default=500)
    args = ap.parse_args()
    task = get_task(args.task)
    problems = task.test_problems(args.n)
    rows = []
    for name, path in (("SLM", args.slm), ("LLM", args.llm)):
        engine = Engine(path, max_model_len=256, max_num_seqs=args.n, num_blocks=args.n * 16 + 16)
        acc = run_point(engine, task, problems, SamplingParams(max_tokens=128))["accuracy"]
        params = sum(p.numel() for p in engine.core.slm.model.parameters())
        size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
        rows.append((name, params, size, acc))
        tok = engine.tokenizer
    rates = token_error_rates(Forcer(args.slm, args.llm), tok, problems[: min(args.n, 300)])
    print(f"| model | parameters | folder size | accuracy on {args.n} held-out (greedy) | "
          "teacher-forced error: digits | other tokens | digits' share of errors |")
    print("|---|---|---|---|---|---|---|")
    for (name, params, size, acc), key in zip(rows, ("slm", "llm")):
        r = rates[key]
        print(f"| {name} | {params / 1e3:.0f}K | {size / 1e6:.2f} MB | {acc:.1%} | {r['digit_error_rate']:.2%} | "
              f"{r['other_error_rate']:.2%} | {r['digit_share_of_errors']:.0%} |")
    print(f"\ndigits are {rates['slm']['digit_share_of_tokens']:.0%} of solution tokens")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
