"""Train a CITER router: shortcut labels (labels.py), weighted BCE, checkpoint selection by
the routing objective on validation positions (the mean recall of mistakes within the
lowest-scored 1/2/5/10% of positions, not BCE: the router only ever acts in that tail),
iterative rounds, and the default τ chosen on routed validation runs.

  citer train-router --slm S --llm L --task arith --out R [--rounds 2] [--short-term]
      [--features hidden+head|hidden] [--labels gold|llm-agreement] [--easy-keep 0.2]
"""
import copy
import json
import os
import time
from dataclasses import dataclass
from typing import List

import numpy as np
import torch
from tqdm import tqdm

from citer import Engine, SamplingParams
from citer.research.evaluate import run_point
from citer.research.router_nets import RouterMLP, save_router
from citer.research.tasks import Task
from citer.research.token_metrics import auroc, recall_at_budgets, routing_objective

from .labels import LabelSet, TeacherForcer, gold_labels, on_policy_labels


@dataclass
class FitResult:
    router: RouterMLP
    best_epoch: int
    history: List[dict]


def fit_router(train: LabelSet, val: LabelSet, hidden_size: int, features: str = "hidden+head",
               epochs: int = 40, lr: float = 1e-3, batch_size: int = 256, patience: int = 8, seed: int = 0,
               progress: bool = True) -> FitResult:
    """Weighted BCE; returns the weights of the epoch with the best routing objective on
    val (ties: the lower validation loss)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny MLP: more threads only add synchronisation
    try:
        return _fit(train, val, hidden_size, features, epochs, lr, batch_size, patience, seed, progress)
    finally:
        torch.set_num_threads(threads)


def _fit(train, val, hidden_size, features, epochs, lr, batch_size, patience, seed, progress) -> FitResult:
    torch.manual_seed(seed)
    x, sx, y, w = train.tensors()
    vx, vs, vy, vw = val.tensors()
    net = RouterMLP(hidden_size, features=features)
    use_sig = net.head_signals
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    loss_fn = torch.nn.BCEWithLogitsLoss(reduction="none")
    best, best_state, best_epoch, history, bad = (-1.0, float("inf")), None, -1, [], 0
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(range(epochs), desc="router epochs", disable=not progress, leave=False)
    for epoch in bar:
        net.train()
        perm = torch.randperm(len(y), generator=g)
        total = 0.0
        for i in range(0, len(y), batch_size):
            idx = perm[i: i + batch_size]
            if len(idx) < 2:  # BatchNorm needs two rows
                continue
            loss = (loss_fn(net(x[idx], sx[idx] if use_sig else None), y[idx]) * w[idx]).sum() / w[idx].sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        net.eval()
        with torch.no_grad():
            logits = net(vx, vs if use_sig else None)
            val_loss = float((loss_fn(logits, vy) * vw).sum() / vw.sum())
            objective = routing_objective(logits, vy, vw)
        history.append({"epoch": epoch, "train_loss": total / len(y), "val_loss": val_loss,
                        "val_objective": objective})
        bar.set_postfix(objective=f"{objective:.4f}", val_loss=f"{val_loss:.4f}")
        key = (objective, -val_loss)
        if key > best:
            best, best_state, best_epoch, bad = key, copy.deepcopy(net.state_dict()), epoch, 0
        else:
            bad += 1
            if bad >= patience:
                break
    net.load_state_dict(best_state)
    return FitResult(net.eval(), best_epoch, history)


TAUS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.993, 0.995, 0.997, 0.998, 0.999, 0.9995)


def choose_threshold(engine: Engine, task: Task, problems, taus=TAUS, max_tokens: int = 128,
                     slack: float = 0.01) -> dict:
    """The cheapest τ whose accuracy is within `slack` of the LLM's on these (validation)
    problems, from routed runs; the share it costs is reported with it."""
    def run(params):
        r = run_point(engine, task, problems, params)
        return r["accuracy"], r["llm_share"]

    llm_acc, _ = run(SamplingParams(max_tokens=max_tokens, policy="llm"))
    sweep = [(tau, *run(SamplingParams(max_tokens=max_tokens, policy="router", threshold=tau))) for tau in taus]
    ok = [s for s in sweep if s[1] >= llm_acc - slack - 1e-9]
    tau, acc, share = min(ok, key=lambda s: s[2]) if ok else max(sweep, key=lambda s: s[1])
    return {"threshold": tau, "accuracy": acc, "llm_share": share, "llm_accuracy": llm_acc, "slack": slack,
            "within_slack": bool(ok), "sweep": [{"threshold": t, "accuracy": a, "llm_share": s} for t, a, s in sweep]}


def train_router(slm: str, llm: str, task: Task, out: str, rounds: int = 2, n_train: int = 800, n_val: int = 200,
                 short_term: bool = False, round_share: float = 0.15, seed: int = 0, max_tokens: int = 128,
                 features: str = "hidden+head", labels: str = "gold", easy_keep: float = 1.0,
                 slack: float = 0.01) -> dict:
    """The whole pipeline; writes a router folder to `out` and returns the metrics."""
    t0 = time.time()
    rng = np.random.default_rng(seed + 777)
    train_p = task.train_problems(n_train, rng)
    val_p = task.train_problems(n_val, rng)
    engine = Engine(slm, llm, max_model_len=256, max_num_seqs=256, num_blocks=256 * 16)
    forcer = TeacherForcer(slm, llm, vocab_limit=engine.core.vocab_limit)
    hidden = engine.slm_config.hidden_size
    metrics = {"task": task.name, "slm": slm, "llm": llm, "short_term": short_term, "features": features,
               "labels": labels, "easy_keep": easy_keep, "n_train": n_train, "n_val": n_val, "seed": seed,
               "rounds": []}
    new_sets = lambda r: (LabelSet(easy_keep=easy_keep, seed=seed + r), LabelSet())  # noqa: E731  (val: all)

    print(f"round 1: labels ({labels}) on {n_train} + {n_val} teacher-forced gold solutions")
    train_l, val_l = new_sets(1)
    gold_labels(engine, forcer, task, train_p, short_term=short_term, max_tokens=max_tokens, into=train_l,
                labels=labels)
    gold_labels(engine, forcer, task, val_p, short_term=short_term, max_tokens=max_tokens, into=val_l, labels=labels)
    fit = fit_router(train_l, val_l, hidden, features, seed=seed)
    metrics["rounds"].append(_round_metrics(1, train_l, val_l, fit, None))
    rounds = 1 if short_term else rounds
    for r in range(2, rounds + 1):
        folder = os.path.join(out, f"round{r - 1}")
        save_router(fit.router, folder)
        engine.set_router(folder)
        cal = engine.calibrate_threshold([p.prompt for p in val_p[:64]], round_share,
                                         SamplingParams(max_tokens=max_tokens), iters=7)
        print(f"round {r}: router in the loop at τ={cal.threshold:.4f} (LLM share {cal.llm_share:.1%})")
        train_r, val_r = new_sets(r)
        for probs, into in ((train_p, train_r), (val_p, val_r)):
            gold_labels(engine, forcer, task, probs, router_threshold=cal.threshold, max_tokens=max_tokens,
                        into=into, labels=labels)
            on_policy_labels(engine, forcer, task, probs, cal.threshold, max_tokens, into=into, labels=labels)
        fit = fit_router(train_r, val_r, hidden, features, seed=seed + r)
        metrics["rounds"].append(_round_metrics(r, train_r, val_r, fit, cal.threshold))
    folder_tmp = os.path.join(out, "final")
    save_router(fit.router, folder_tmp)
    engine.set_router(folder_tmp)
    choice = choose_threshold(engine, task, val_p, max_tokens=max_tokens, slack=slack)
    metrics["default_threshold"] = choice
    metrics["seconds"] = time.time() - t0
    save_router(fit.router, out, default_threshold=choice["threshold"], meta=metrics)
    print(f"router saved to {out}: default τ={choice['threshold']} (validation: {choice['accuracy']:.1%} at "
          f"{choice['llm_share']:.1%} LLM tokens; LLM {choice['llm_accuracy']:.1%}; {time.time() - t0:.0f} s)")
    return metrics


def _round_metrics(r, train_l, val_l, fit, threshold) -> dict:
    best = fit.history[fit.best_epoch]
    _, _, y, w = train_l.tensors()
    vx, vs, vy, _ = val_l.tensors()
    with torch.no_grad():
        score = fit.router(vx, vs if fit.router.head_signals else None)
    row = {"round": r, "threshold_in_loop": threshold, "train_labels": len(train_l),
           "train_positive_share": float((y * w).sum() / w.sum()), "cases": dict(train_l.cases),
           "val_cases": dict(val_l.cases), "best_epoch": fit.best_epoch, "epochs_run": len(fit.history),
           "val_loss": best["val_loss"], "val_objective": best["val_objective"],
           "val_auroc": auroc(score, vy), "val_auroc_top_prob": auroc(vs[:, 0], vy),
           "val_recall": {str(k): v for k, v in recall_at_budgets(score, vy).items()},
           "val_recall_top_prob": {str(k): v for k, v in recall_at_budgets(vs[:, 0], vy).items()}}
    print(json.dumps(row))
    return row
