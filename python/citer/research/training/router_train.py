"""Train a CITER router: shortcut labels (labels.py), weighted BCE, checkpoint selection by
the routing objective on validation positions (the mean recall of mistakes within the
lowest-scored 1/2/5/10% of positions, not BCE: the router only ever acts in that tail),
iterative rounds, and the default τ chosen on routed validation runs.

  citer train-router --slm S --llm L --task arith --out R [--rounds 2] [--short-term]
      [--features hidden+head|hidden] [--labels gold|llm-agreement] [--easy-keep 0.2]
  citer train-router --slm S --llm L --data train.jsonl --val-data val.jsonl --out R
      --labels llm-agreement --dtype bfloat16        # a real pair on your own data

Labels that need no rollouts (llm-agreement, and CITER-S's short-term labels) are read off
teacher-forced positions computed once and cached on disk (positions.py): the path for
real pairs, where the forward passes are the cost. Round 2 of llm-agreement adds the
routed system's own trajectories (the router of round 1 in the loop), teacher-forced the
same way. Without a checker (data with references only) the default τ is chosen on the
validation positions: the smallest τ whose router sends the LLM at least target_recall of
the positions where the SLM's greedy token is not the LLM's, or (target_share) the τ that
sends that share of them: a budget, since without a checker nothing measures accuracy.
"""
import copy
import json
import os
import time
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch
from tqdm import tqdm

from citer import Engine, SamplingParams
from citer.research.evaluate import run_point
from citer.research.router_nets import RouterMLP, save_router
from citer.research.tasks import Task
from citer.research.token_metrics import auroc, recall_at_budgets, routing_objective

from .forcing import Forcer
from .labels import LabelSet, gold_labels, on_policy_labels
from .positions import Positions, force_positions, labels_of, sequences


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
    if hidden_size <= 256:
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
                 slack: float = 0.01, dtype: str = "float32", max_len: int = 256, target_recall: float = 0.9,
                 n_onpolicy: Optional[int] = None, cache: Optional[str] = None,
                 target_share: Optional[float] = None) -> dict:
    """The whole pipeline; writes a router folder to `out` and returns the metrics."""
    if labels == "llm-agreement" or short_term:
        return train_on_positions(slm, llm, task, out, rounds=rounds, n_train=n_train, n_val=n_val,
                                  short_term=short_term, round_share=round_share, seed=seed, max_tokens=max_tokens,
                                  features=features, easy_keep=easy_keep, slack=slack, dtype=dtype, max_len=max_len,
                                  target_recall=target_recall, n_onpolicy=n_onpolicy, cache=cache,
                                  target_share=target_share)
    if not task.has_checker:
        raise ValueError(f"task {task.name!r} has no checker (no tests or answers), so CITER's long-term labels "
                         "cannot be rolled out; train with labels='llm-agreement' or short_term=True (CITER-S)")
    t0 = time.time()
    rng = np.random.default_rng(seed + 777)
    train_p = task.train_problems(n_train, rng)
    val_p = task.validation_problems(n_val, rng)
    engine = Engine(slm, llm, max_model_len=_model_len(slm, llm, max_len + max_tokens), max_num_seqs=256,
                    num_blocks=256 * 16, dtype=dtype)
    cap = min(max_len, engine.config.max_model_len)  # rollouts start inside prompt + reference
    fits = lambda ps: [p for p in ps if len(engine.tokenizer(p.prompt + p.solution).input_ids) < cap]  # noqa: E731
    train_p, val_p = fits(train_p), fits(val_p)
    if not train_p or not val_p:
        raise ValueError(f"no training or validation problem fits in {cap} tokens (prompt + reference; max_len)")
    forcer = Forcer(slm, llm, dtype=engine.args.dtype, vocab_limit=engine.core.vocab_limit,
                    max_positions=max(engine.config.max_model_len, 4096))
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


def _model_len(slm: str, llm: Optional[str], want: int) -> int:
    """want, or less where a model's max_position_embeddings is less."""
    from citer.engine.models import load_model_config

    return min([want] + [load_model_config(p).max_position_embeddings for p in (slm, llm) if p])


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


def resolve_labels(labels: str, short_term: bool, task: Task):
    """--labels auto: what the data allows -> (labels, short_term). Long-term CITER labels need
    references and a checker; references alone give the short-term (CITER-S) labels; prompts
    alone give llm-agreement on the LLM's own trajectories. --labels gold without a checker:
    the short-term ones, as its help says."""
    if labels == "gold":
        return labels, short_term or not task.has_checker
    if labels != "auto":
        return labels, short_term
    probe = task.train_problems(1, np.random.default_rng(0))
    has_refs = bool(probe and probe[0].solution)
    if not has_refs:
        return "llm-agreement", False
    return "gold", short_term or not task.has_checker


def train_on_positions(slm: str, llm: str, task: Task, out: str, rounds: int = 2, n_train: int = 800,
                       n_val: int = 200, short_term: bool = False, round_share: float = 0.15, seed: int = 0,
                       max_tokens: int = 128, features: str = "hidden+head", easy_keep: float = 1.0,
                       slack: float = 0.01, dtype: str = "float32", max_len: int = 256, target_recall: float = 0.9,
                       n_onpolicy: Optional[int] = None, cache: Optional[str] = None,
                       target_share: Optional[float] = None) -> dict:
    """llm-agreement (CITER distillation) or short-term (CITER-S) labels on cached teacher-forced
    positions: references first, then (llm-agreement, rounds >= 2) the routed system's own
    trajectories of n_onpolicy training prompts (and as large a share of the validation
    prompts); see the module doc. cache: the folder of the teacher-forced chunks (default
    out/cache; share it between runs on the same data, e.g. CITER and CITER-S)."""
    import resource

    t0 = time.time()
    scheme = "short-term" if short_term else "llm-agreement"
    rng = np.random.default_rng(seed + 777)
    train_p, val_p = task.train_problems(n_train, rng), task.validation_problems(n_val, rng)
    engine = Engine(slm, llm, dtype=dtype, max_model_len=_model_len(slm, llm, max_len + max_tokens), max_num_seqs=64)
    max_len = min(max_len, engine.config.max_model_len - 1)  # a prompt must leave room for a token
    forcer = Forcer.from_engine(engine)
    tok, hidden = engine.tokenizer, engine.slm_config.hidden_size
    cache = cache or os.path.join(out, "cache")
    metrics = {"task": task.name, "slm": slm, "llm": llm, "short_term": short_term, "features": features,
               "labels": scheme, "easy_keep": easy_keep, "n_train": n_train, "n_val": n_val, "seed": seed,
               "dtype": dtype, "rounds": [], "timings": {}}

    def refs(problems, name):
        """References where the data has them; else the LLM's own greedy trajectories."""
        parts, with_ref = [], [p for p in problems if p.solution]
        without = [p for p in problems if not p.solution and len(tok(p.prompt).input_ids) < max_len]
        if with_ref:
            seqs, starts, _ = sequences(tok, with_ref, max_len)
            metrics[f"{name}_references"] = len(seqs)
            parts.append(force_positions(forcer, seqs, starts, gold=True, desc=f"teacher forcing {name} references",
                                         cache=os.path.join(cache, f"{name}-references")))
        if without:
            if short_term:
                raise ValueError(f"CITER-S's short-term labels need references; {len(without)} {name} problems "
                                 "have none (train with labels='llm-agreement')")
            params = SamplingParams(max_tokens=max_tokens, policy="llm")
            gens = engine.generate([p.prompt for p in without], task.sampling_params(without, params), use_tqdm=True)
            seqs = [g.prompt_token_ids + g.token_ids for g in gens if g.token_ids]
            metrics[f"{name}_llm_trajectories"] = len(seqs)
            parts.append(force_positions(forcer, seqs, [len(g.prompt_token_ids) for g in gens if g.token_ids],
                                         gold=False, cache=os.path.join(cache, f"{name}-llm-trajectories"),
                                         desc=f"teacher forcing {name} LLM trajectories"))
        parts = [p for p in parts if p is not None]
        if not parts:
            raise ValueError(f"no {name} sequence fits max_len={max_len} tokens")
        return Positions.cat(parts)

    tick = time.time()
    pos = {"train": refs(train_p, "train"), "val": refs(val_p, "val")}
    metrics["timings"]["references"] = time.time() - tick
    fit = _fit_positions(pos, scheme, hidden, features, easy_keep, seed)
    metrics["rounds"].append(_round_metrics(1, *fit[1:], None))
    for r in range(2, (1 if short_term else rounds) + 1):
        tau = float(_scores(fit[0], fit[2]).quantile(round_share))  # the round's router in the loop at ~round_share
        folder = os.path.join(out, f"round{r - 1}")
        save_router(fit[0], folder)
        engine.set_router(folder)
        tick = time.time()
        frac = min(1.0, n_onpolicy / max(len(train_p), 1)) if n_onpolicy is not None else 1.0
        for name, problems in (("train", train_p), ("val", val_p)):
            problems = [p for p in problems if len(tok(p.prompt).input_ids) < max_len]  # what fits
            problems = problems[:max(1, round(frac * len(problems)))]
            params = SamplingParams(max_tokens=max_tokens, policy="router", threshold=tau)
            gens = engine.generate([p.prompt for p in problems], task.sampling_params(problems, params),
                                   use_tqdm=True)
            seqs = [g.prompt_token_ids + g.token_ids for g in gens if g.token_ids]
            starts = [len(g.prompt_token_ids) for g in gens if g.token_ids]
            traj = force_positions(forcer, seqs, starts, gold=False, cache=os.path.join(cache, f"{name}-round{r}"),
                                   desc=f"teacher forcing {name} trajectories")
            pos[name] = Positions.cat([pos[name], traj]) if traj is not None else pos[name]
        metrics["timings"][f"round{r}"] = time.time() - tick
        fit = _fit_positions(pos, scheme, hidden, features, easy_keep, seed + r)
        metrics["rounds"].append(_round_metrics(r, *fit[1:], tau))
    router, train_l, val_l, fr = fit
    if task.has_checker:
        folder = os.path.join(out, "final")
        save_router(fr.router, folder)
        engine.set_router(folder)
        fit_val = [p for p in val_p if len(tok(p.prompt).input_ids) < max_len]  # as the rounds: what fits
        choice = choose_threshold(engine, task, fit_val, max_tokens=max_tokens, slack=slack)
    elif target_share is not None:
        choice = share_threshold(router, val_l, target_share)
    else:
        choice = recall_threshold(router, val_l, target_recall)
    metrics["default_threshold"] = choice
    metrics["seconds"] = time.time() - t0
    metrics["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    save_router(router, out, default_threshold=choice["threshold"], meta=metrics)
    print(f"router saved to {out}: default τ={choice['threshold']:.4f} ({json.dumps(choice)[:200]}); "
          f"{metrics['seconds']:.0f} s, peak memory {metrics['peak_rss_gb']:.1f} GB")
    return metrics


def _fit_positions(pos, scheme, hidden, features, easy_keep, seed):
    sets = {}
    for name in ("train", "val"):
        x, s, y, cases = labels_of(pos[name], scheme)
        ls = LabelSet(easy_keep=easy_keep if name == "train" else 1.0, seed=seed)
        ls.add(x, s, y)
        ls.cases.update(cases)
        sets[name] = ls
    fit = fit_router(sets["train"], sets["val"], hidden, features, seed=seed)
    return fit.router, sets["train"], sets["val"], fit


def _scores(router, val: LabelSet) -> torch.Tensor:
    vx, vs, _, _ = val.tensors()
    with torch.no_grad():
        return torch.sigmoid(router(vx, vs if router.head_signals else None))


def share_threshold(router, val: LabelSet, target_share: float) -> dict:
    """The τ at which the router sends the LLM target_share of the validation positions (a
    budget: without a checker nothing says which share keeps the LLM's accuracy)."""
    p = _scores(router, val)
    y = val.tensors()[2]
    tau = float(torch.quantile(p, target_share))
    neg = p[y == 0]
    return {"rule": "share of validation positions", "threshold": tau, "target_share": target_share,
            "llm_share_of_positions": float((p < tau).float().mean()), "positions": len(p),
            "recall": float((neg < tau).float().mean()) if len(neg) else None}


def recall_threshold(router, val: LabelSet, target_recall: float) -> dict:
    """The smallest τ at which the router sends the LLM target_recall of the validation
    positions labelled 0 (LLM when p < τ), and the share of positions it sends there."""
    p = _scores(router, val)
    y = val.tensors()[2]
    neg = p[y == 0]
    # "higher": a τ at or above target_recall of them (linear interpolation can land between two
    # scores and, with few labelled positions, send the LLM far fewer than asked)
    tau = float(torch.quantile(neg, target_recall, interpolation="higher")) + 1e-6 if len(neg) else 0.5
    return {"rule": "recall of validation positions labelled 0", "threshold": tau, "target_recall": target_recall,
            "recall": float((neg < tau).float().mean()) if len(neg) else None,
            "llm_share_of_positions": float((p < tau).float().mean()), "positions": len(p)}
