"""Evaluation on a task: `run_point` (accuracy, LLM-token share and wall-clock per token of
one setting on a list of problems; what training, the reports and the demo measure with)
and `citer eval`'s sweep over CITER's router, the CITER-S ablation, random and
confidence routing and the two single-model baselines, written as a JSON table and a PNG.
"""
import json
import os
import time
from typing import Dict, List, Optional

import numpy as np
from tqdm import tqdm

from citer import Engine, SamplingParams
from citer.engine.outputs import llm_share
from citer.tasks import Task

ROUTER_TAUS = (0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999)
RANDOM_FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7)
CONFIDENCE_THRESHOLDS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


def run_point(engine: Engine, task: Task, problems, params: SamplingParams) -> dict:
    t0 = time.perf_counter()
    outs = engine.generate([p.prompt for p in problems], params)
    seconds = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for o in outs)
    return {
        "accuracy": float(np.mean([task.check(o.text, p) for o, p in zip(outs, problems)])),
        "llm_share": llm_share(outs),
        "ms_per_token": seconds / max(tokens, 1) * 1e3,
        "tokens": tokens,
        "llm_forward_tokens": sum(o.stats["llm_forward_tokens"] for o in outs),
        "slm_forward_tokens": sum(o.stats["slm_forward_tokens"] for o in outs),
    }


def sweep(engine: Engine, task: Task, n: int, router_s: Optional[str] = None, max_tokens: int = 128,
          routers: Optional[Dict[str, str]] = None) -> List[dict]:
    problems = task.test_problems(n)
    base = dict(max_tokens=max_tokens)
    points = [("slm", None, dict(policy="slm")), ("llm", None, dict(policy="llm"))]
    # no per-request seed: each request then draws its own (from the engine's seeded RNG), so
    # requests do not all share one routing pattern
    points += [("random", f, dict(policy="random", llm_fraction=f)) for f in RANDOM_FRACTIONS]
    points += [("confidence", c, dict(policy="confidence", confidence_threshold=c)) for c in CONFIDENCE_THRESHOLDS]
    routers = dict(routers or {})
    if engine.router is not None:
        routers.setdefault("CITER", engine.paths["router"])
    if router_s:
        routers["CITER-S"] = router_s
    for name in routers:
        points += [(name, t, dict(policy="router", threshold=t)) for t in ROUTER_TAUS]
    rows, current = [], engine.paths["router"]
    run_point(engine, task, problems[:64], SamplingParams(**base, policy="llm"))  # warm-up, not timed
    for method, knob, kw in tqdm(points, desc=f"eval on {n} held-out problems"):
        if method in routers and routers[method] != current:
            engine.set_router(routers[method])
            current = routers[method]
        rows.append({"method": method, "knob": knob, **run_point(engine, task, problems, SamplingParams(**base, **kw))})
    return rows


def plot(rows: List[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    styles = {"CITER": "o-", "CITER-S": "s--", "random": "^:", "confidence": "d-."}
    for method, style in styles.items():
        pts = sorted((r for r in rows if r["method"] == method), key=lambda r: r["llm_share"])
        if pts:
            xs = [100 * r["llm_share"] for r in pts]
            ax1.plot(xs, [100 * r["accuracy"] for r in pts], style, label=method)
            ax2.plot(xs, [r["ms_per_token"] for r in pts], style, label=method)
    for method, color in (("slm", "gray"), ("llm", "black")):
        r = next((r for r in rows if r["method"] == method), None)
        if r:
            ax1.axhline(100 * r["accuracy"], color=color, lw=0.8, ls="--", label=f"{method.upper()} only")
            ax2.axhline(r["ms_per_token"], color=color, lw=0.8, ls="--", label=f"{method.upper()} only")
    ax1.set(xlabel="tokens made by the LLM (%)", ylabel="held-out accuracy (%)", title=title)
    ax2.set(xlabel="tokens made by the LLM (%)", ylabel="wall-clock ms per token (batched)", title="cost")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(rows: List[dict]) -> str:
    lines = [f"{'method':<11} {'knob':>7} {'accuracy':>9} {'LLM share':>10} {'ms/token':>9}"]
    for r in rows:
        knob = "" if r["knob"] is None else f"{r['knob']:g}"
        lines.append(f"{r['method']:<11} {knob:>7} {r['accuracy']:>9.1%} {r['llm_share']:>10.1%} "
                     f"{r['ms_per_token']:>9.3f}")
    return "\n".join(lines)


def write(rows: List[dict], out: str, title: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "eval.json"), "w") as f:
        json.dump(rows, f, indent=1)
    plot(rows, os.path.join(out, "accuracy_vs_llm_share.png"), title)
