"""Evaluation on the user's own data (citer eval --data): pass@1 (or accuracy) against the
LLM's share of tokens for every method, with paired bootstrap intervals, on the test split.

Methods: the SLM and the LLM alone; each router given (CITER, CITER-S, ...) and the
confidence rule at knobs chosen to land near target LLM shares; random routing; the
query-level router (whole queries to the LLM, from the SLM-only and LLM-only runs);
check-and-correct (verify=True) with the first router; speculative decoding (lossless:
the LLM's own output); the token-match oracle (the first k SLM/LLM mismatches routed).

Knobs by target share: the SLM-only run's own outputs are teacher-forced once (the SLM's
forward only: no labels, no LLM) and each router's τ (or the confidence threshold) is the
quantile of its scores there that sends `share` of those positions to the LLM. The routed
runs land near, not at, their targets (their trajectories differ after the first LLM
token); every point is plotted at the share it actually reached.

Every point's per-problem results go to OUT/points.jsonl as soon as it finishes, so an
interrupted evaluation resumes where it stopped. Runs may use deferred LLM calls
(max_llm_wait): in the parking mode they change when the LLM runs, never what it makes.
"""
import hashlib
import json
import os
import time
from dataclasses import replace
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from citer import Engine, SamplingParams
from citer.engine.models.router import load_router

from .eval_stats import Bootstrap, interval, mean_accuracy, point_intervals, share_to_reach
from .evaluate import run_point
from .training.forcing import Forcer

TARGET_SHARES = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3)
RANDOM_SHARES = (0.05, 0.15, 0.3)
QUERY_SHARES = (0.05, 0.1, 0.2, 0.3, 0.5)
ORACLE_KS = (1, 2, 4, 8)


class PointLog:
    """points.jsonl: one JSON line per finished point (method, knob, results)."""

    def __init__(self, path: str):
        self.path = path
        self.rows: Dict[tuple, dict] = {}
        if os.path.isfile(path):
            with open(path) as f:
                for line in f:
                    r = json.loads(line)
                    self.rows[(r["method"], r["knob"])] = r

    def get(self, method: str, knob) -> Optional[dict]:
        return self.rows.get((method, knob))

    def add(self, row: dict) -> dict:
        self.rows[(row["method"], row["knob"])] = row
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        return row


def knobs_for_shares(engine: Engine, slm_outputs, routers: Dict[str, str], shares: Sequence[float]) -> Dict[str, list]:
    """Per method (each router, "confidence"): the knob that sends each target share of the
    SLM-only outputs' positions to the LLM (see the module doc)."""
    forcer = Forcer.from_engine(engine)
    seqs = [o.prompt_token_ids + o.token_ids for o in slm_outputs if o.token_ids]
    starts = [len(o.prompt_token_ids) for o in slm_outputs if o.token_ids]
    llm, forcer.llm = forcer.llm, None  # the SLM's forward only
    try:
        forced = forcer.run(seqs, starts=starts)
    finally:
        forcer.llm = llm
    h = torch.cat([f.hidden[:-1] for f in forced])
    sig = torch.cat([f.signals[:-1] for f in forced])
    out = {"confidence": [float(torch.quantile(torch.sigmoid(sig[:, 0]), s)) for s in shares]}
    for name, path in routers.items():
        r = load_router(path, h.shape[1])
        p = r.score(h, sig if r.head_signals else None)
        out[name] = [float(torch.quantile(p, s)) for s in shares]
    return out


def _knobs(engine: Engine, task, problems, routers: Dict[str, str], shares: Sequence[float], max_tokens: int,
           path: str) -> Dict[str, list]:
    """knobs_for_shares, kept in `path`: a resumed run reuses them, and computes only those of
    routers added since (all of them if the target shares changed)."""
    knobs = {}
    if os.path.isfile(path):
        with open(path) as f:
            knobs = json.load(f)
        if knobs.pop("shares", list(shares)) != list(shares):  # files from before "shares" was kept: as asked
            knobs = {}
    missing = {name: p for name, p in routers.items() if name not in knobs}
    if missing or "confidence" not in knobs:
        slm_outs = engine.generate([p.prompt for p in problems], task.sampling_params(problems, SamplingParams(
            max_tokens=max_tokens, policy="slm")))
        knobs = {**knobs_for_shares(engine, slm_outs, missing, shares), **knobs}
        with open(path, "w") as f:
            json.dump({**knobs, "shares": list(shares)}, f, indent=1)
    return knobs


def _same_run(path: str, engine: Engine, problems: List, routers: Dict[str, str], max_tokens: int) -> None:
    """A resumed evaluation must be the same one: the points in OUT are reused only for the same
    problems, models, dtype and max_tokens, and each router name for the same folder (routers
    may be added). The first run writes what it is; a run with other settings is refused."""
    now = {"problems": hashlib.sha1(json.dumps([p.prompt for p in problems]).encode()).hexdigest()[:16],
           "n_problems": len(problems), "slm": engine.paths["slm"], "llm": engine.paths["llm"],
           "dtype": str(engine.args.dtype), "max_tokens": max_tokens, "routers": dict(routers)}
    if os.path.isfile(path):
        with open(path) as f:
            was = json.load(f)
        differ = [f"{k} {was.get(k)!r} there, {now[k]!r} now" for k in now if k != "routers" and was.get(k) != now[k]]
        differ += [f"router {n!r} from {was['routers'][n]!r} there, {p!r} now" for n, p in routers.items()
                   if was.get("routers", {}).get(n, p) != p]
        if differ:
            raise ValueError(f"{os.path.dirname(path)!r} holds an evaluation with other settings "
                             f"({'; '.join(differ)}); its points would be reused: give another --out, "
                             "or delete that folder")
        now["routers"] = {**was.get("routers", {}), **routers}
    with open(path, "w") as f:
        json.dump(now, f, indent=1)


def evaluate_data(engine: Engine, task, problems: List, routers: Dict[str, str], out: str, max_tokens: int = 192,
                  shares: Sequence[float] = TARGET_SHARES, query_router: Optional[str] = None,
                  oracle_ks: Sequence[int] = ORACLE_KS, verify_shares: Sequence[float] = (0.1, 0.2),
                  speculative: bool = True, n_boot: int = 1000, gap: float = 0.02, max_share: float = 0.3,
                  random_shares: Sequence[float] = RANDOM_SHARES) -> dict:
    """Every method on `problems`, points logged to out/points.jsonl; -> the result dict
    (rows with per-problem results, summary with paired bootstrap intervals)."""
    os.makedirs(out, exist_ok=True)
    _same_run(os.path.join(out, "run.json"), engine, problems, routers, max_tokens)
    log = PointLog(os.path.join(out, "points.jsonl"))
    base = SamplingParams(max_tokens=max_tokens)

    def point(method, knob, **kw):
        row = log.get(method, knob)
        if row is None:
            router = kw.pop("router_path", None)
            if router is not None and engine.paths["router"] != router:
                engine.set_router(router)
            t0 = time.perf_counter()
            row = log.add({"method": method, "knob": knob, **run_point(engine, task, problems, replace(base, **kw))})
            print(f"{method} {knob}: acc {row['accuracy']:.3f} share {row['llm_share']:.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        return row

    slm = point("slm", None, policy="slm")
    llm = point("llm", None, policy="llm")
    knobs = _knobs(engine, task, problems, routers, shares, max_tokens, os.path.join(out, "knobs.json"))
    todo = [("confidence", k, dict(policy="confidence", confidence_threshold=k)) for k in knobs["confidence"]]
    for name, path in routers.items():
        todo += [(name, t, dict(policy="router", threshold=t, router_path=path)) for t in knobs[name]]
    todo += [("random", f, dict(policy="random", llm_fraction=f)) for f in random_shares]
    first = next(iter(routers), None)
    if first is not None:
        for s in verify_shares:
            t = knobs[first][list(shares).index(s)] if s in shares else None
            if t is not None:
                todo.append((f"{first} + verify", t, dict(policy="router", threshold=t, verify=True,
                                                          router_path=routers[first])))
    if speculative:
        todo.append(("speculative", 4, dict(policy="speculative", num_draft_tokens=4)))
    rows = [slm, llm] + [point(m, k, **kw) for m, k, kw in tqdm(todo, desc="eval points")]
    if query_router:
        rows += query_rows(engine, task, problems, query_router, slm, llm)
    if oracle_ks:
        rows += oracle_rows(engine, task, problems, oracle_ks, max_tokens, log)
    return summarize_rows(rows, len(problems), n_boot, gap, max_share)


def query_rows(engine: Engine, task, problems, path: str, slm: dict, llm: dict) -> List[dict]:
    from .baselines import QueryRouter
    from .evaluate import query_level_rows

    forcer = Forcer.from_engine(engine)
    scores = QueryRouter.load(path).score(forcer, engine.tokenizer, [p.prompt for p in problems]).numpy()
    return query_level_rows(scores, slm, llm, QUERY_SHARES)


def oracle_rows(engine: Engine, task, problems, ks, max_tokens: int, log: PointLog) -> List[dict]:
    from .oracle import oracle_points

    if all(log.get("oracle", k) is not None for k in ks):
        return [log.get("oracle", k) for k in ks]
    forcer = Forcer.from_engine(engine)
    rows = []
    for pt in oracle_points(engine, forcer, task, problems, ks, max_tokens):
        pp = {k: [int(v) for v in pt[k].tolist()] for k in ("correct", "tokens", "llm_tokens")}
        rows.append(log.add({"method": "oracle", "knob": pt["k"], "accuracy": float(np.mean(pp["correct"])),
                             "llm_share": sum(pp["llm_tokens"]) / max(sum(pp["tokens"]), 1), "ms_per_token": None,
                             "tokens": sum(pp["tokens"]), "per_problem": pp}))
    return rows


def summarize_rows(rows: List[dict], n: int, n_boot: int, gap: float, max_share: float) -> dict:
    """Intervals per point; per curve the share to reach LLM - gap and the mean accuracy over
    shares 0-max_share, and against the confidence rule the differences of both (paired:
    every curve sees the same resampled problems)."""
    boot = Bootstrap(n, n_boot)
    for r in rows:
        r.update(point_intervals(boot, r["per_problem"]))
    by = {r["method"]: r for r in rows if r["knob"] is None}
    curves = {}
    for m in dict.fromkeys(r["method"] for r in rows if r["knob"] is not None and r["method"] != "random"):
        pts = [r["per_problem"] for r in rows if r["method"] == m]
        curves[m] = boot.curve(pts, by["slm"]["per_problem"], by["llm"]["per_problem"])
    reach = {m: share_to_reach(c, gap) for m, c in curves.items()}
    area = {m: mean_accuracy(c, max_share) for m, c in curves.items()}
    summary = {}
    for m in curves:
        row = {f"share_to_llm_minus_{gap:g}": float(np.median(reach[m])), "share_ci": interval(reach[m]),
               f"mean_accuracy_0_{max_share:g}": float(np.median(area[m])), "mean_accuracy_ci": interval(area[m])}
        if "confidence" in curves and m != "confidence":
            d = area[m] - area["confidence"]
            ratio = reach[m] / np.maximum(reach["confidence"], 1e-9)
            row.update({"area_minus_confidence": float(np.median(d)), "area_minus_confidence_ci": interval(d),
                        "share_ratio_to_confidence": float(np.median(ratio)),
                        "share_ratio_to_confidence_ci": interval(ratio)})
        summary[m] = row
    return {"n": n, "n_boot": n_boot, "gap": gap, "max_share": max_share, "rows": rows, "summary": summary}


def time_methods(engine: Engine, task, problems, methods: Dict[str, dict], batch_sizes=(1, 16), repeats: int = 3,
                 max_tokens: int = 192) -> Dict[str, Dict[int, float]]:
    """ms per generated token of each method (name -> SamplingParams fields, with
    router_path for router policies), at each batch size, medians of interleaved rounds
    (every method once per round), on the first problems (batch 1: one at a time)."""
    times: Dict[str, Dict[int, List[float]]] = {m: {b: [] for b in batch_sizes} for m in methods}
    engine.generate([problems[0].prompt], SamplingParams(max_tokens=8, policy="llm"))  # warm-up
    for _ in tqdm(range(repeats), desc="timing rounds"):
        for name, kw in methods.items():
            kw = dict(kw)
            router = kw.pop("router_path", None)
            if router is not None and engine.paths["router"] != router:
                engine.set_router(router)
            params = SamplingParams(max_tokens=max_tokens, **kw)
            for b in batch_sizes:
                probs = problems[:max(b, 4)] if b == 1 else problems[:b]
                tokens, seconds = 0, 0.0
                groups = [[p] for p in probs] if b == 1 else [probs]
                for g in groups:
                    t0 = time.perf_counter()
                    outs = engine.generate([p.prompt for p in g], task.sampling_params(g, params))
                    seconds += time.perf_counter() - t0
                    tokens += sum(len(o.token_ids) for o in outs)
                times[name][b].append(seconds / max(tokens, 1) * 1e3)
    return {m: {b: float(np.median(v)) for b, v in per.items()} for m, per in times.items()}


def write_data_eval(result: dict, out: str, title: str, timings: Optional[Dict[str, Dict[int, float]]] = None) -> None:
    """eval.json (rows without per-problem results, summary, timings) and the plots: pass@1
    against LLM share (all shares; 0-30%) and, with timings, against ms/token."""
    from .evaluate import _public, plot

    os.makedirs(out, exist_ok=True)
    public = {**result, "rows": [_public(r) for r in result["rows"]], "timings_ms_per_token": timings}
    with open(os.path.join(out, "eval.json"), "w") as f:
        json.dump(public, f, indent=1)
    rows = result["rows"]
    plot(rows, os.path.join(out, "pass_vs_llm_share.png"), title)
    plot(rows, os.path.join(out, "pass_vs_llm_share_0_30.png"), title + " (shares 0-30%)", result["max_share"])
    if timings:
        plot_speed(rows, timings, os.path.join(out, "pass_vs_ms_per_token.png"), title)


def plot_speed(rows: List[dict], timings: Dict[str, Dict[int, float]], path: str, title: str) -> None:
    """Accuracy against ms/token (batch 1 and batched) of the timed methods' points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({int(b) for t in timings.values() for b in t})
    fig, axes = plt.subplots(1, len(batches), figsize=(6.5 * len(batches), 5), squeeze=False)
    for ax, b in zip(axes[0], batches):
        for name, t in timings.items():
            r = next((r for r in rows if f"{r['method']} {r['knob']}" == name or
                      (r["knob"] is None and r["method"] == name)), None)
            if r is None or b not in {int(k) for k in t}:
                continue
            ms = {int(k): v for k, v in t.items()}[b]
            ax.errorbar([ms], [100 * r["accuracy"]], yerr=[[100 * (r["accuracy"] - r["accuracy_ci"][0])],
                                                           [100 * (r["accuracy_ci"][1] - r["accuracy"])]],
                        fmt="o", capsize=3, label=f"{name} ({100 * r['llm_share']:.0f}% LLM)")
        ax.set(xlabel=f"ms per token (batch {b})", ylabel="pass@1 (%, 95% bootstrap CI)", title=f"{title}: cost")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def data_table(result: dict, timings: Optional[Dict[str, Dict[int, float]]] = None) -> str:
    lines = [f"{'method':<24} {'knob':>8} {'pass@1':>7} {'95% CI':>11} {'LLM share':>9}"]
    for r in result["rows"]:
        knob = "" if r["knob"] is None else f"{r['knob']:.4g}"
        ci = f"{100 * r['accuracy_ci'][0]:.1f}-{100 * r['accuracy_ci'][1]:.1f}"
        lines.append(f"{r['method']:<24} {knob:>8} {r['accuracy']:>7.1%} {ci:>11} {r['llm_share']:>9.1%}")
    g, m = result["gap"], result["max_share"]
    lines += ["", f"{'curve':<24} {'share to LLM-' + format(100 * g, 'g') + 'pt':>18} {'mean pass 0-' + format(100 * m, 'g') + '%':>16}"
              f" {'- confidence (CI)':>24} {'share / confidence (CI)':>26}"]
    for name, s in result["summary"].items():
        share = s[f"share_to_llm_minus_{g:g}"]
        d = (f"{100 * s['area_minus_confidence']:+.2f} ({100 * s['area_minus_confidence_ci'][0]:+.2f}/"
             f"{100 * s['area_minus_confidence_ci'][1]:+.2f})") if "area_minus_confidence" in s else ""
        q = (f"{s['share_ratio_to_confidence']:.2f} ({s['share_ratio_to_confidence_ci'][0]:.2f}-"
             f"{s['share_ratio_to_confidence_ci'][1]:.2f})") if "share_ratio_to_confidence" in s else ""
        lines.append(f"{name:<24} {share:>18.1%} {s[f'mean_accuracy_0_{m:g}']:>16.1%} {d:>24} {q:>26}")
    if timings:
        lines += ["", "ms per token: " + "; ".join(f"{k}: " + ", ".join(f"batch {b} {v:.1f}" for b, v in t.items())
                                                  for k, t in timings.items())]
    return "\n".join(lines)
