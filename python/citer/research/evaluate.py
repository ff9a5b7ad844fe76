"""Evaluation on a task: `run_point` (accuracy, LLM-token share and wall-clock per token of
one setting on a list of problems, with per-problem results for the bootstrap; what
training, the reports and the demo measure with), `sweep` over the methods, and
`evaluate`, what `citer eval` runs: every method on problems drawn with a seed neither
training nor τ selection saw, bootstrap intervals (eval_stats), the token-match oracle's
curve (oracle.py), the query-level and Co-LLM-style baselines (baselines.py) and a
token-level report, written as a JSON file, a table and a PNG.
"""
import json
import os
import time
from typing import Dict, List, Optional

import numpy as np
from tqdm import tqdm

from citer import Engine, SamplingParams
from citer.engine.outputs import llm_share
from citer.research.tasks import Task

ROUTER_TAUS = (0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.993, 0.995, 0.997, 0.998, 0.999,
               0.9995)
RANDOM_FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7)
CONFIDENCE_THRESHOLDS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.998)
QUERY_SHARES = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7)  # of queries sent wholly to the LLM
ORACLE_KS = (1, 2, 3, 4, 6, 8, 12)
EVAL_SEED = 20261202  # the problems `citer eval` draws by default (not the training stream's seed + 777)


def run_point(engine: Engine, task: Task, problems, params: SamplingParams) -> dict:
    t0 = time.perf_counter()
    outs = engine.generate([p.prompt for p in problems], task.sampling_params(problems, params))
    seconds = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for o in outs)
    correct = [bool(c) for c in task.check_many([o.text for o in outs], problems)]
    return {
        "accuracy": float(np.mean(correct)),
        "llm_share": llm_share(outs),
        "ms_per_token": seconds / max(tokens, 1) * 1e3,
        "tokens": tokens,
        "llm_forward_tokens": sum(o.stats["llm_forward_tokens"] for o in outs),
        "slm_forward_tokens": sum(o.stats["slm_forward_tokens"] for o in outs),
        "per_problem": {"correct": correct, "tokens": [len(o.token_ids) for o in outs],
                        "llm_tokens": [int(sum(o.from_llm)) for o in outs]},
    }


def sweep(engine: Engine, task: Task, n: int, router_s: Optional[str] = None, max_tokens: int = 128,
          routers: Optional[Dict[str, str]] = None, problems=None, progress: bool = True) -> List[dict]:
    """slm, llm, random, confidence and each router (name -> folder; the engine's own is
    "CITER", router_s "CITER-S") over its τ grid. Rows keep per-problem results."""
    problems = problems if problems is not None else task.test_problems(n)
    base = dict(max_tokens=max_tokens)
    points = [("slm", None, dict(policy="slm")), ("llm", None, dict(policy="llm"))]
    # no per-request seed: each request then draws its own (from the engine's seeded RNG), so
    # requests do not all share one routing pattern
    points += [("random", f, dict(policy="random", llm_fraction=f)) for f in RANDOM_FRACTIONS]
    points += [("confidence", c, dict(policy="confidence", confidence_threshold=c)) for c in CONFIDENCE_THRESHOLDS]
    routers = dict(routers or {})
    if engine.router is not None:
        routers = {"CITER": engine.paths["router"], **routers}
    if router_s:
        routers["CITER-S"] = router_s
    for name, path in routers.items():
        points += [(name, t, dict(policy="router", threshold=t)) for t in router_taus(path)]
    rows, own = [], engine.paths["router"]
    current = own
    run_point(engine, task, problems[:64], SamplingParams(**base, policy="llm"))  # warm-up, not timed
    try:
        for method, knob, kw in tqdm(points, desc=f"eval on {len(problems)} problems", disable=not progress):
            if method in routers and routers[method] != current:
                engine.set_router(routers[method])
                current = routers[method]
            rows.append({"method": method, "knob": knob,
                         **run_point(engine, task, problems, SamplingParams(**base, **kw))})
    finally:
        if current != own:  # the engine leaves with the router it came with
            engine.set_router(own)
    return rows


def router_taus(path: str) -> List[float]:
    """The τ grid a router is swept over: its own `sweep_taus` (the Co-LLM head's, whose scores
    are not calibrated to the grid) or ROUTER_TAUS."""
    from citer.research.router_nets import load_router_mlp

    return list(load_router_mlp(path)[1].get("meta", {}).get("sweep_taus") or ROUTER_TAUS)


def query_level_rows(scores: np.ndarray, slm_row: dict, llm_row: dict, shares=QUERY_SHARES) -> List[dict]:
    """Query-level routing from the per-query SLM-only and LLM-only results: the queries
    with the lowest P(SLM right) go wholly to the LLM; knob = the share of queries."""
    s, l = slm_row["per_problem"], llm_row["per_problem"]
    order = np.argsort(scores, kind="stable")
    rows = []
    for q in shares:
        to_llm = np.zeros(len(scores), dtype=bool)
        to_llm[order[:int(round(q * len(scores)))]] = True
        pick = lambda k: [l[k][i] if to_llm[i] else s[k][i] for i in range(len(scores))]  # noqa: E731
        correct, tokens = pick("correct"), pick("tokens")
        llm_tokens = [l["tokens"][i] if to_llm[i] else 0 for i in range(len(scores))]
        ms = (slm_row["ms_per_token"] * sum(s["tokens"][i] for i in range(len(scores)) if not to_llm[i])
              + llm_row["ms_per_token"] * sum(llm_tokens)) / max(sum(tokens), 1)
        rows.append({"method": "query-level", "knob": q, "accuracy": float(np.mean(correct)),
                     "llm_share": sum(llm_tokens) / max(sum(tokens), 1), "ms_per_token": ms, "tokens": sum(tokens),
                     "per_problem": {"correct": correct, "tokens": tokens, "llm_tokens": llm_tokens}})
    return rows


def fresh_problems(task: Task, n: int, seed: int, exclude_meta: List[dict], max_draws: int = 20) -> List:
    """n distinct problems from `seed`, none of them a prompt a router's training or validation
    drew (regenerated from its metadata: seed + 777 stream, n_train + n_val problems). A
    ValueError, not a hang, when max_draws * n draws cannot find that many."""
    seen = set()
    for meta in exclude_meta:
        if meta and "n_train" in meta:
            rng = np.random.default_rng(meta.get("seed", 0) + 777)
            seen |= {p.prompt for p in task.train_problems(meta["n_train"] + meta.get("n_val", 0), rng)}
    rng, out, drawn, n_seen = np.random.default_rng(seed), [], 0, len(seen)
    while len(out) < n:
        if drawn >= max_draws * n:
            raise ValueError(f"task {task.name!r}: only {len(out)} of {n} problems drawn from seed {seed} are not "
                             f"among the {n_seen} prompts the routers trained or validated on "
                             f"({drawn} drawn); use a smaller n or a task with more distinct problems")
        batch = task.train_problems(n - len(out), rng)
        drawn += len(batch)
        for p in batch:
            if p.prompt not in seen:  # distinct, and none a router saw
                seen.add(p.prompt)
                out.append(p)
    return out


def evaluate(engine: Engine, task: Task, n: int, seed: int = EVAL_SEED, routers: Optional[Dict[str, str]] = None,
             query_router: Optional[str] = None, oracle: bool = True, max_tokens: int = 128,
             n_boot: int = 1000) -> dict:
    """Everything `citer eval` reports (see the module doc)."""
    from citer.research.eval_stats import Bootstrap, point_intervals, summarize
    from citer.research.router_nets import load_router_mlp
    from citer.research.training.forcing import Forcer

    routers = dict(routers or {})
    metas = []
    for path in ([engine.paths["router"]] if engine.router is not None else []) + list(routers.values()):
        metas.append(load_router_mlp(path)[1].get("meta", {}))
    if query_router:  # its training problems too
        from citer.research.baselines import QueryRouter

        metas.append(QueryRouter.load(query_router).meta)
    problems = fresh_problems(task, n, seed, metas)
    rows = sweep(engine, task, n, routers=routers, problems=problems, max_tokens=max_tokens)
    by = {r["method"]: r for r in rows if r["knob"] is None}
    forcer = Forcer(engine.paths["slm"], engine.paths["llm"], dtype=engine.args.dtype,
                    vocab_limit=engine.core.vocab_limit)
    if query_router:
        from citer.research.baselines import QueryRouter

        qr = QueryRouter.load(query_router)
        scores = qr.score(forcer, engine.tokenizer, [p.prompt for p in problems]).numpy()
        rows += query_level_rows(scores, by["slm"], by["llm"])
    if oracle:
        from citer.research.oracle import oracle_points

        for pt in oracle_points(engine, forcer, task, problems, ORACLE_KS, max_tokens):
            pp = {k: pt[k].tolist() for k in ("correct", "tokens", "llm_tokens")}
            rows.append({"method": "oracle", "knob": pt["k"], "accuracy": float(np.mean(pp["correct"])),
                         "llm_share": sum(pp["llm_tokens"]) / max(sum(pp["tokens"]), 1), "ms_per_token": None,
                         "tokens": sum(pp["tokens"]), "per_problem": pp})
    boot = Bootstrap(len(problems), n_boot)
    for r in rows:
        r.update(point_intervals(boot, r["per_problem"]))
    curves = {}
    for m in dict.fromkeys(r["method"] for r in rows if r["knob"] is not None and r["method"] != "random"):
        pts = [r["per_problem"] for r in rows if r["method"] == m]
        curves[m] = boot.curve(pts, by["slm"]["per_problem"], by["llm"]["per_problem"])
    summary = summarize(curves)
    names = {"CITER": engine.paths["router"], **routers} if engine.router is not None else routers
    report = token_report(engine, forcer, task, problems, names)
    return {"task": task.name, "n": len(problems), "seed": seed, "n_boot": n_boot,
            "problems": "drawn with numpy default_rng(seed) through task.train_problems, skipping the "
                        "held-out split and every prompt the routers' training and validation drew",
            "rows": rows, "summary": summary, "token_report": report}


def token_report(engine: Engine, forcer, task: Task, problems, routers: Dict[str, str]) -> dict:
    """On the problems' teacher-forced gold solutions: AUROC of each score against the SLM's
    mistakes (greedy token != gold) and against SLM/LLM disagreement, and the recall of
    mistakes within the lowest-scored 1/2/5/10% of positions."""
    import torch

    from citer.engine.models.router import load_router
    from citer.research.token_metrics import auroc, recall_at_budgets
    from citer.research.training.positions import reference_sequences

    tok = engine.tokenizer
    seqs, starts = reference_sequences(tok, problems)
    h, sig, ok, agree = [], [], [], []
    for seq, start, f in zip(seqs, starts, forcer.run(seqs)):
        pos = torch.arange(start - 1, len(seq) - 1)
        h.append(f.hidden[pos])
        sig.append(f.signals[pos])
        ok.append((f.slm_pred[pos] == torch.tensor(seq[start:])).float())
        agree.append((f.slm_pred[pos] == f.llm_pred[pos]).float())
    h, sig, ok, agree = (torch.cat(t) for t in (h, sig, ok, agree))
    scores = {"confidence": sig[:, 0]}
    for name, path in routers.items():
        r = load_router(path, h.shape[1])
        scores[name] = r.score(h, sig if r.head_signals else None)
    out = {"positions": len(ok), "slm_mistakes": int((ok == 0).sum()), "disagreements": int((agree == 0).sum()),
           "scores": {}}
    for name, s in scores.items():
        out["scores"][name] = {"auroc_mistakes": auroc(s, ok), "auroc_disagreement": auroc(s, agree),
                               "recall_of_mistakes": {str(k): v for k, v in recall_at_budgets(s, ok).items()}}
    return out


STYLES = {"CITER": "o-", "CITER-S": "s--", "CITER (hidden only)": "v-", "Co-LLM": "P-", "confidence": "d-.",
          "query-level": "x:", "random": "^:", "oracle": "*-"}


def plot(rows: List[dict], path: str, title: str, max_share: Optional[float] = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    methods = list(dict.fromkeys(r["method"] for r in rows if r["knob"] is not None))
    for method in methods:
        pts = sorted((r for r in rows if r["method"] == method), key=lambda r: r["llm_share"])
        if max_share is not None:
            pts = [r for r in pts if r["llm_share"] <= max_share]
        if not pts:
            continue
        style = STYLES.get(method, "o-")
        xs = [100 * r["llm_share"] for r in pts]
        ys = [100 * r["accuracy"] for r in pts]
        if "accuracy_ci" in pts[0]:
            err = [[100 * (r["accuracy"] - r["accuracy_ci"][0]) for r in pts],
                   [100 * (r["accuracy_ci"][1] - r["accuracy"]) for r in pts]]
            ax1.errorbar(xs, ys, yerr=err, fmt=style, label=method, capsize=2, ms=4, lw=1)
        else:
            ax1.plot(xs, ys, style, label=method)
        timed = [(x, r["ms_per_token"]) for x, r in zip(xs, pts) if r.get("ms_per_token")]
        if timed and method != "query-level":
            ax2.plot([t[0] for t in timed], [t[1] for t in timed], style, label=method)
    for method, color in (("slm", "gray"), ("llm", "black")):
        r = next((r for r in rows if r["method"] == method), None)
        if r:
            ax1.axhline(100 * r["accuracy"], color=color, lw=0.8, ls="--", label=f"{method.upper()} only")
            ax2.axhline(r["ms_per_token"], color=color, lw=0.8, ls="--", label=f"{method.upper()} only")
            if method == "llm":
                ax1.axhline(100 * r["accuracy"] - 1, color="black", lw=0.5, ls=":", label="LLM - 1 point")
    ax1.set(xlabel="tokens made by the LLM (%)", ylabel="accuracy (%, 95% bootstrap CI)", title=title)
    ax2.set(xlabel="tokens made by the LLM (%)", ylabel="wall-clock ms per token (batched)", title="cost")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        if max_share is not None:
            ax.set_xlim(-0.5, 100 * max_share)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(rows: List[dict]) -> str:
    lines = [f"{'method':<20} {'knob':>7} {'accuracy':>9} {'95% CI':>13} {'LLM share':>10} {'ms/token':>9}"]
    for r in rows:
        knob = "" if r["knob"] is None else f"{r['knob']:g}"
        ci = f"{100 * r['accuracy_ci'][0]:.1f}-{100 * r['accuracy_ci'][1]:.1f}" if "accuracy_ci" in r else ""
        ms = f"{r['ms_per_token']:.3f}" if r.get("ms_per_token") else "-"
        lines.append(f"{r['method']:<20} {knob:>7} {r['accuracy']:>9.1%} {ci:>13} {r['llm_share']:>10.1%} {ms:>9}")
    return "\n".join(lines)


def summary_table(summary: Dict[str, Dict]) -> str:
    lines = [f"{'method':<20} {'share to LLM-1pt':>17} {'95% CI':>13} {'mean acc 0-20%':>15} "
             f"{'- confidence':>13} {'95% CI':>15}"]
    for m, r in summary.items():
        ci = r["share_to_reach_ci"]
        d = r.get("area_minus_confidence")
        dci = r.get("area_minus_confidence_ci")
        lines.append(f"{m:<20} {r['share_to_reach']:>17.1%} {100 * ci[0]:>6.1f}-{100 * ci[1]:<6.1f} "
                     f"{r['mean_accuracy_0_20']:>15.1%} " + (f"{100 * d:>+12.2f}p {100 * dci[0]:>+7.2f}/{100 * dci[1]:<+7.2f}"
                                                            if d is not None else f"{'':>13} {'':>15}"))
    return "\n".join(lines)


def _public(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "per_problem"}


def write(rows: List[dict], out: str, title: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "eval.json"), "w") as f:
        json.dump([_public(r) for r in rows], f, indent=1)
    plot(rows, os.path.join(out, "accuracy_vs_llm_share.png"), title)


def write_eval(result: dict, out: str, title: str) -> None:
    """eval.json (rows without the per-problem results, summary, token report) and two PNGs
    (all shares; shares 0-20%)."""
    os.makedirs(out, exist_ok=True)
    public = {**result, "rows": [_public(r) for r in result["rows"]]}
    with open(os.path.join(out, "eval.json"), "w") as f:
        json.dump(public, f, indent=1)
    plot(result["rows"], os.path.join(out, "accuracy_vs_llm_share.png"), title)
    plot(result["rows"], os.path.join(out, "accuracy_vs_llm_share_0_20.png"), title + " (shares 0-20%)", 0.2)


def token_table(report: dict) -> str:
    lines = [f"{report['positions']} positions, {report['slm_mistakes']} SLM mistakes, "
             f"{report['disagreements']} SLM/LLM disagreements",
             f"{'score':<20} {'AUROC mistakes':>15} {'AUROC disagree':>15} " + " ".join(
                 f"{'recall@' + k:>11}" for k in next(iter(report["scores"].values()))["recall_of_mistakes"])]
    for name, r in report["scores"].items():
        lines.append(f"{name:<20} {r['auroc_mistakes']:>15.4f} {r['auroc_disagreement']:>15.4f} "
                     + " ".join(f"{v:>11.1%}" for v in r["recall_of_mistakes"].values()))
    return "\n".join(lines)
