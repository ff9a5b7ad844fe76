"""Token routing vs speculative decoding vs the baselines, end to end, at equal quality.

1. Quality, on the embedded demo pair: each method decodes the task's held-out problems
   (greedy, batched): accuracy with a bootstrap 95% CI (problems resampled), LLM calls
   per generated token, LLM-made tokens per token, SLM tokens rolled back per token,
   and the demo pair's own wall-clock ms/token. Each request's choices are recorded
   (replay.py).
2. Cost at a realistic size ratio: the recorded choices of --replay-n problems are
   replayed one request at a time (batch 1) on random-weight Qwen2-shaped models
   (CPU: an 11M SLM and a 100M LLM, as benchmarks/routed_decoding.py; GPU: Qwen2-0.5B /
   1.5B, and 0.5B / 7B with --shapes gpu7b), so each accuracy is paired with the time
   its work costs at that size: the same forwards, catch-ups, verifications and
   rollbacks.
3. The outside reference: transformers assisted generation (model.generate with
   assistant_model=, greedy) on the demo pair, the same prompts at batch 1: its tokens
   must equal citer's speculative output, and ms/token is compared with citer's.
Prints one table, writes --out/compare.json and --out/accuracy_vs_ms_per_token.png.

  .venv/bin/python benchmarks/compare_policies.py [-n 500] [--replay-n 24] [--out docs/compare]
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import build_random_qwen2, scratch_dir  # noqa: E402
from citer.research.replay import Trace, record, replaying  # noqa: E402

METHODS = {  # name -> SamplingParams fields
    "SLM": dict(policy="slm"),
    "LLM": dict(policy="llm"),
    "CITER τ=0.9": dict(policy="router", threshold=0.9),
    "CITER τ=0.99": dict(policy="router", threshold=0.99),
    "CITER τ=0.999": dict(policy="router", threshold=0.999),
    "CITER τ=0.99 + verify": dict(policy="router", threshold=0.99, verify=True),
    "confidence 0.9": dict(policy="confidence", confidence_threshold=0.9),
    "confidence 0.9 + verify": dict(policy="confidence", confidence_threshold=0.9, verify=True),
    "random 0.1": dict(policy="random", llm_fraction=0.1, seed=0),
    "speculative k=4": dict(policy="speculative", num_draft_tokens=4),
    "speculative adaptive (≤8, 0.9)": dict(policy="speculative", num_draft_tokens=8, draft_confidence=0.9),
}
SHAPES = {"cpu": ("qwen2-10m", "qwen2-100m", "cpu", "float32"), "gpu": ("qwen2-0.5b", "qwen2-1.5b", "cuda", "bfloat16"),
          "gpu7b": ("qwen2-0.5b", "qwen2-7b", "cuda", "bfloat16"), "tiny": ("qwen2-tiny", "qwen2-10m", "cpu", "float32")}


def bootstrap_ci(correct, n_boot=1000, seed=0):
    x = np.asarray(correct, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(x), (n_boot, len(x)))
    means = x[idx].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def quality(engine, task, problems, max_tokens):
    """Phase 1 -> rows (one per method) and traces (method -> request index -> trace)."""
    from citer import SamplingParams

    rows, traces = [], {}
    engine.generate([p.prompt for p in problems[:32]], SamplingParams(max_tokens=max_tokens, policy="llm"))  # warm-up
    for name, kw in tqdm(METHODS.items(), desc="quality on the demo pair"):
        got = {}
        with record(engine, got):
            t0 = time.perf_counter()
            outs = engine.generate([p.prompt for p in problems], SamplingParams(max_tokens=max_tokens, **kw))
            secs = time.perf_counter() - t0
        correct = [task.check(o.text, p) for o, p in zip(outs, problems)]
        n = sum(len(o.token_ids) for o in outs)
        stat = lambda k: sum(o.stats.get(k, 0) for o in outs) / max(n, 1)  # noqa: E731
        lo, hi = bootstrap_ci(correct)
        rows.append(dict(method=name, accuracy=float(np.mean(correct)), ci=[lo, hi], tokens=n,
                         llm_calls_per_token=stat("llm_calls"), llm_tokens_per_token=stat("llm_tokens"),
                         slm_discarded_per_token=stat("slm_discarded_tokens"),
                         acceptance=(sum(o.stats.get("accepted", 0) for o in outs)
                                     / max(sum(o.stats.get("drafted", 0) for o in outs), 1)),
                         demo_ms_per_token=secs / max(n, 1) * 1e3))
        traces[name] = [dict(prompt=o.prompt_token_ids, n=len(o.token_ids), **got.get(o.request_id, Trace()).to_json())
                        for o in outs]
    return rows, traces


def replay_costs(traces, shapes, n_replay, repeats):
    """Phase 2 -> method -> ms/token at batch 1 on the random-weight pair."""
    from citer import Engine, SamplingParams
    from citer.research.router_nets import RouterMLP, save_router
    from citer.engine.models import load_model_config

    slm_name, llm_name, device, dtype = SHAPES[shapes]
    root = scratch_dir()
    init = device if device == "cuda" else "cpu"
    slm = build_random_qwen2(slm_name, root, seed=2, dtype=getattr(torch, dtype), device=init)
    llm = build_random_qwen2(llm_name, root, seed=1, dtype=getattr(torch, dtype), device=init)
    router = os.path.join(root, f"router-{slm_name}")
    if not os.path.isfile(os.path.join(router, "router_config.json")):
        torch.manual_seed(0)
        save_router(RouterMLP(load_model_config(slm).hidden_size).eval(), router)
    engine = Engine(slm, llm, router, device=device, dtype=dtype, max_model_len=512, max_num_seqs=4)
    out = {}
    bar = tqdm(total=len(METHODS) * repeats * n_replay, desc=f"replay at {slm_name} / {llm_name}")
    for r in range(repeats + 1):  # the first round warms up (compiles, caches)
        for name, kw in METHODS.items():
            reqs = traces[name][:n_replay]
            recorded = {f"replay-{i}": t for i, t in enumerate(reqs)}
            secs, toks = 0.0, 0
            with replaying(recorded):
                for i, t in enumerate(reqs):
                    rid = engine.add_request(t["prompt"], SamplingParams(max_tokens=t["n"], ignore_eos=True, **kw),
                                             request_id=f"replay-{i}")
                    t0 = time.perf_counter()
                    done = None
                    while done is None:
                        done = next((ev.output for ev in engine.step() if ev.output is not None), None)
                    if device == "cuda":
                        torch.cuda.synchronize()
                    secs += time.perf_counter() - t0
                    toks += len(done.token_ids)
                    assert done.request_id == rid and len(done.token_ids) == t["n"], (name, i)
                    if r:
                        bar.update(1)
            if r:
                out.setdefault(name, []).append(secs / toks * 1e3)
    bar.close()
    return {k: float(np.median(v)) for k, v in out.items()}, f"{slm_name} / {llm_name} ({device}, {dtype})"


def assisted(problems, max_tokens, n):
    """Phase 3: transformers assisted generation vs citer speculative, demo pair, batch 1."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from citer import Engine, SamplingParams
    from citer.assets import default_paths

    slm_p, llm_p, _ = default_paths()
    tok = AutoTokenizer.from_pretrained(llm_p)
    hf_llm = AutoModelForCausalLM.from_pretrained(llm_p, dtype=torch.float32).eval()
    hf_slm = AutoModelForCausalLM.from_pretrained(slm_p, dtype=torch.float32).eval()
    engine = Engine(max_model_len=256, num_blocks=256, max_num_seqs=4)
    ids = [tok(p.prompt).input_ids for p in problems[:n]]
    runs = {"transformers assisted": [], "citer speculative k=4": [], "citer llm": []}
    same, tokens = 0, 0
    for r in range(3):  # round 0 warms up
        t_hf = t_spec = t_llm = 0.0
        for x in ids:
            t0 = time.perf_counter()
            with torch.inference_mode():
                hf = hf_llm.generate(torch.tensor([x]), assistant_model=hf_slm, do_sample=False,
                                     max_new_tokens=max_tokens)[0, len(x):].tolist()
            t1 = time.perf_counter()
            spec = engine.generate([x], SamplingParams(max_tokens=max_tokens, policy="speculative"))[0].token_ids
            t2 = time.perf_counter()
            engine.generate([x], SamplingParams(max_tokens=max_tokens, policy="llm"))
            t3 = time.perf_counter()
            t_hf, t_spec, t_llm = t_hf + t1 - t0, t_spec + t2 - t1, t_llm + t3 - t2
            if r == 0:
                same += hf == spec
                tokens += len(spec)
        if r:
            for k, t in zip(runs, (t_hf, t_spec, t_llm)):
                runs[k].append(t / tokens * 1e3)
    return dict(same_tokens=f"{same}/{len(ids)}", ms_per_token={k: float(np.median(v)) for k, v in runs.items()})


def plot(rows, costs, where, path, floor=85.0):
    """Accuracy (95% CI) vs replayed ms/token and vs LLM calls per token; methods under
    `floor` % are drawn on the floor as down-pointing triangles (their accuracy in the legend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.5))
    colors = plt.get_cmap("tab20").colors
    markers = {"SLM": "s", "LLM": "D", "CITER": "o", "confid": "^", "random": "x", "specul": "*"}
    for i, r in enumerate(rows):
        acc, (lo, hi) = 100 * r["accuracy"], r["ci"]
        low = acc < floor
        marker = "v" if low else next(m for k, m in markers.items() if r["method"].startswith(k))
        label = r["method"] + (f" ({acc:.0f}%, below the axis)" if low else "")
        y, err = (floor + 0.3, None) if low else (acc, [[acc - 100 * lo], [100 * hi - acc]])
        for ax, x in ((ax1, costs[r["method"]]), (ax2, r["llm_calls_per_token"])):
            ax.errorbar([x], [y], yerr=err, fmt=marker, ms=9 if marker == "*" else 6, capsize=3, color=colors[i],
                        label=label if ax is ax2 else None)
    ax1.set(xlabel=f"ms per token, batch 1, replayed at {where}", ylabel="held-out accuracy (%, 95% CI)",
            title="accuracy vs time", ylim=(floor, 100))
    ax2.set(xlabel="LLM calls per generated token", title="accuracy vs LLM calls", ylim=(floor, 100))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax2.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=500, help="held-out problems for quality")
    ap.add_argument("--replay-n", type=int, default=24, help="problems replayed per method (batch 1)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shapes", choices=SHAPES, default="cpu")
    ap.add_argument("--assisted-n", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--out", default="docs/compare")
    ap.add_argument("--replot", action="store_true", help="only redraw --out's plot from its compare.json")
    args = ap.parse_args()
    if args.replot:
        return replot(args.out)
    from citer import Engine
    from citer.research.tasks import get_task

    task = get_task("arith")
    problems = task.test_problems(args.n)
    demo = Engine(max_model_len=256, max_num_seqs=512, num_blocks=512 * 16)
    rows, traces = quality(demo, task, problems, args.max_tokens)
    costs, where = replay_costs(traces, args.shapes, args.replay_n, args.repeats)
    ref = assisted(problems, args.max_tokens, args.assisted_n) if args.assisted_n else None
    llm_cost = costs["LLM"]
    print(f"\n{args.n} held-out arith problems (demo pair, greedy); time: {args.replay_n} of them replayed at "
          f"batch 1 on {where}, median of {args.repeats}")
    print(f"{'method':<31} {'accuracy':>8} {'95% CI':>13} {'LLM calls':>9} {'LLM tok':>7} {'SLM rolled':>10} "
          f"{'accept':>6} {'ms/tok':>7} {'vs LLM':>6} {'demo ms':>7}")
    for r in rows:
        c = costs[r["method"]]
        acc = f"{r['acceptance']:.2f}" if r["method"].startswith("speculative") else ""
        print(f"{r['method']:<31} {r['accuracy']:>8.1%} {r['ci'][0]:>6.1%}-{r['ci'][1]:<6.1%} "
              f"{r['llm_calls_per_token']:>9.3f} {r['llm_tokens_per_token']:>7.3f} {r['slm_discarded_per_token']:>10.3f} "
              f"{acc:>6} {c:>7.2f} {llm_cost / c:>5.2f}x {r['demo_ms_per_token']:>7.3f}")
    if ref:
        print(f"\ntransformers assisted generation vs citer on the demo pair, batch 1 ({args.assisted_n} prompts): "
              f"same tokens as citer speculative {ref['same_tokens']}; ms/token " +
              ", ".join(f"{k} {v:.2f}" for k, v in ref["ms_per_token"].items()))
    os.makedirs(args.out, exist_ok=True)
    for r in rows:
        r["replay_ms_per_token"] = costs[r["method"]]
    with open(os.path.join(args.out, "compare.json"), "w") as f:
        json.dump(dict(n=args.n, replay_n=args.replay_n, replayed_at=where, rows=rows, assisted=ref), f, indent=1)
    plot(rows, costs, where, os.path.join(args.out, "accuracy_vs_ms_per_token.png"))
    print(f"wrote {args.out}/compare.json and {args.out}/accuracy_vs_ms_per_token.png")


def replot(out: str) -> None:
    """Redraw the plot from a compare.json (python benchmarks/compare_policies.py --replot DIR)."""
    with open(os.path.join(out, "compare.json")) as f:
        d = json.load(f)
    plot(d["rows"], {r["method"]: r["replay_ms_per_token"] for r in d["rows"]}, d["replayed_at"],
         os.path.join(out, "accuracy_vs_ms_per_token.png"))


if __name__ == "__main__":
    main()
