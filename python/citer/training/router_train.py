"""Train a CITER router: shortcut labels (labels.py), BCE, early stopping on validation
loss keeping the best checkpoint (the reference code saves the last one), iterative rounds.

  citer train-router --slm S --llm L --task arith --out R [--rounds 2] [--short-term]
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
from citer.evaluate import run_point
from citer.router import RouterMLP, save_router
from citer.tasks import Task

from .labels import LabelSet, TeacherForcer, gold_labels, on_policy_labels


@dataclass
class FitResult:
    router: RouterMLP
    best_epoch: int
    history: List[dict]


def fit_router(train: LabelSet, val: LabelSet, hidden_size: int, epochs: int = 60, lr: float = 1e-3,
               batch_size: int = 256, patience: int = 8, seed: int = 0, progress: bool = True) -> FitResult:
    """BCE training; returns the weights of the epoch with the lowest validation loss."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny MLP: more threads only add synchronisation
    try:
        return _fit(train, val, hidden_size, epochs, lr, batch_size, patience, seed, progress)
    finally:
        torch.set_num_threads(threads)


def _fit(train, val, hidden_size, epochs, lr, batch_size, patience, seed, progress) -> FitResult:
    torch.manual_seed(seed)
    x, y = train.tensors()
    vx, vy = val.tensors()
    net = RouterMLP(hidden_size)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    best, best_state, best_epoch, history, bad = float("inf"), None, -1, [], 0
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
            loss = loss_fn(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        net.eval()
        with torch.no_grad():
            logits = net(vx)
            val_loss = loss_fn(logits, vy).item()
            val_acc = ((logits > 0).float() == vy).float().mean().item()
        history.append({"epoch": epoch, "train_loss": total / len(y), "val_loss": val_loss, "val_acc": val_acc})
        bar.set_postfix(val_loss=f"{val_loss:.4f}")
        if val_loss < best - 1e-5:
            best, best_state, best_epoch, bad = val_loss, copy.deepcopy(net.state_dict()), epoch, 0
        else:
            bad += 1
            if bad >= patience:
                break
    net.load_state_dict(best_state)
    return FitResult(net.eval(), best_epoch, history)


def choose_threshold(engine: Engine, task: Task, problems, taus=(0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99),
                     max_tokens: int = 128, slack: float = 0.02) -> dict:
    """The cheapest τ whose accuracy is within `slack` of the LLM's on these problems."""
    def run(params):
        r = run_point(engine, task, problems, params)
        return r["accuracy"], r["llm_share"]

    llm_acc, _ = run(SamplingParams(max_tokens=max_tokens, policy="llm"))
    sweep = [(tau, *run(SamplingParams(max_tokens=max_tokens, policy="router", threshold=tau))) for tau in taus]
    ok = [s for s in sweep if s[1] >= llm_acc - slack]
    tau = min(ok, key=lambda s: s[2])[0] if ok else max(sweep, key=lambda s: s[1])[0]
    return {"threshold": tau, "llm_accuracy": llm_acc,
            "sweep": [{"threshold": t, "accuracy": a, "llm_share": s} for t, a, s in sweep]}


def train_router(slm: str, llm: str, task: Task, out: str, rounds: int = 2, n_train: int = 800, n_val: int = 200,
                 short_term: bool = False, round_share: float = 0.15, seed: int = 0, max_tokens: int = 128) -> dict:
    """The whole pipeline; writes a router folder to `out` and returns the metrics."""
    t0 = time.time()
    rng = np.random.default_rng(seed + 777)
    train_p = task.train_problems(n_train, rng)
    val_p = task.train_problems(n_val, rng)
    engine = Engine(slm, llm, max_model_len=256, max_num_seqs=256, num_blocks=256 * 16)
    forcer = TeacherForcer(slm, llm)
    hidden = engine.slm_config.hidden_size
    metrics = {"task": task.name, "slm": slm, "llm": llm, "short_term": short_term, "rounds": []}

    print(f"round 1: labels on {n_train} + {n_val} teacher-forced gold solutions")
    train_l = gold_labels(engine, forcer, task, train_p, short_term=short_term, max_tokens=max_tokens)
    val_l = gold_labels(engine, forcer, task, val_p, short_term=short_term, max_tokens=max_tokens)
    fit = fit_router(train_l, val_l, hidden, seed=seed)
    metrics["rounds"].append(_round_metrics(1, train_l, val_l, fit, None))
    rounds = 1 if short_term else rounds
    for r in range(2, rounds + 1):
        folder = os.path.join(out, f"round{r - 1}")
        save_router(fit.router, folder)
        engine.set_router(folder)
        cal = engine.calibrate_threshold([p.prompt for p in val_p[:64]], round_share,
                                         SamplingParams(max_tokens=max_tokens), iters=7)
        print(f"round {r}: router in the loop at τ={cal.threshold:.4f} (LLM share {cal.llm_share:.1%})")
        train_r = gold_labels(engine, forcer, task, train_p, router_threshold=cal.threshold, max_tokens=max_tokens)
        val_r = gold_labels(engine, forcer, task, val_p, router_threshold=cal.threshold, max_tokens=max_tokens)
        on_policy_labels(engine, forcer, task, train_p, cal.threshold, max_tokens, into=train_r)
        on_policy_labels(engine, forcer, task, val_p, cal.threshold, max_tokens, into=val_r)
        fit = fit_router(train_r, val_r, hidden, seed=seed + r)
        metrics["rounds"].append(_round_metrics(r, train_r, val_r, fit, cal.threshold))
    folder_tmp = os.path.join(out, "final")
    save_router(fit.router, folder_tmp)
    engine.set_router(folder_tmp)
    choice = choose_threshold(engine, task, val_p, max_tokens=max_tokens)
    metrics["default_threshold"] = choice
    metrics["seconds"] = time.time() - t0
    save_router(fit.router, out, default_threshold=choice["threshold"], meta=metrics)
    print(f"router saved to {out}: default τ={choice['threshold']} ({time.time() - t0:.0f} s)")
    return metrics


def _round_metrics(r, train_l, val_l, fit, threshold) -> dict:
    best = fit.history[fit.best_epoch]
    row = {"round": r, "threshold_in_loop": threshold, "train_labels": int(sum(len(y) for y in train_l.labels)),
           "train_positive_share": float(torch.cat(train_l.labels).mean()), "cases": dict(train_l.cases),
           "best_epoch": fit.best_epoch, "epochs_run": len(fit.history), "val_loss": best["val_loss"],
           "val_acc": best["val_acc"]}
    print(json.dumps(row))
    return row
