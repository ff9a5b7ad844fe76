"""The baselines CITER is measured against, beside random and confidence routing:

  - query-level routing (RouteLLM-style): a logistic classifier on the SLM's normed final
    hidden state at the prompt's last position predicts whether the SLM alone answers
    right; queries under a threshold go wholly to the LLM (QueryRouter);
  - Co-LLM's deferral head: a linear head on the SLM's hidden state, initialized from
    Co-LLM's weak labels (defer where the LLM gives the gold token a higher probability
    than the SLM), then trained as Co-LLM trains it, on the marginal likelihood of the gold
    tokens with deferral as the latent variable (colm_marginal_nll); both models stay frozen
    (Co-LLM also fine-tunes its base model). Saved as a router folder (LinearRouter) that
    the engine routes with like any router.

  citer train-baselines --slm S --llm L --task arith --out DIR   # DIR/query, DIR/colm

On data without a checker (`--data`, references only) the query router's label is instead
whether the SLM agrees with the LLM on at least the median share of a query's reference
positions (P(the SLM alone is about as good as the LLM here)), read off the same cached
teacher-forced positions the router trained on (training.positions); the Co-LLM head
trains on those positions' log-probabilities of the reference tokens.
"""
import json
import os
from typing import List, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from citer import Engine, SamplingParams
from citer.research.router_nets import LinearRouter, save_router
from citer.research.tasks import Problem, Task
from citer.research.training.forcing import Forcer
from citer.research.training.positions import reference_sequences

QUERY_ARCHITECTURE = "citer-query-router"
# the deferral shares (of the training positions) at which `citer eval` sweeps the Co-LLM head,
# and the one its default τ defers
COLM_SWEEP_SHARES = (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 0.9)
COLM_DEFAULT_SHARE = 0.1


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, epochs: int = 30, lr: float = 3e-3, seed: int = 0,
                  weight_decay: float = 1e-4, desc: str = "fit") -> torch.nn.Linear:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(x.shape[1], 1)
    opt = torch.optim.Adam(lin.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), desc=desc, leave=False):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 256):
            idx = perm[i:i + 256]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(lin(x[idx]).squeeze(-1), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return lin.eval()


class QueryRouter:
    """P(the SLM alone answers this query right) = sigmoid(w . h_prompt + b)."""

    def __init__(self, linear: torch.nn.Linear, meta=None):
        self.linear, self.meta = linear, meta or {}

    @torch.no_grad()
    def score(self, forcer: Forcer, tokenizer, prompts: List[str]) -> torch.Tensor:  # [N]
        return torch.sigmoid(self.linear(prompt_features(forcer, tokenizer, prompts)).squeeze(-1))

    def policies(self, forcer: Forcer, tokenizer, prompts: List[str], threshold: float) -> List[str]:
        """Per query: "llm" where the score is under threshold, else "slm"."""
        return ["llm" if s < threshold else "slm" for s in self.score(forcer, tokenizer, prompts).tolist()]

    def save(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.linear.state_dict().items()},
                  os.path.join(path, "query_router.safetensors"))
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({"architecture": QUERY_ARCHITECTURE, "hidden_size": self.linear.in_features,
                       "meta": self.meta}, f, indent=1)

    @classmethod
    def load(cls, path: str) -> "QueryRouter":
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"query router folder {path!r} has no config.json")
        with open(cfg_path) as f:
            cfg = json.load(f)
        if cfg.get("architecture") != QUERY_ARCHITECTURE:
            raise ValueError(f"{cfg_path}: architecture {cfg.get('architecture')!r} is not {QUERY_ARCHITECTURE!r}")
        lin = torch.nn.Linear(cfg["hidden_size"], 1)
        lin.load_state_dict(load_file(os.path.join(path, "query_router.safetensors")))
        return cls(lin.eval(), cfg.get("meta"))


def prompt_features(forcer: Forcer, tokenizer, prompts: List[str]) -> torch.Tensor:
    """The SLM's normed final hidden state at each prompt's last token [N, H]."""
    seqs = [tokenizer(p).input_ids for p in prompts]
    return torch.stack([f.hidden[-1] for f in forcer.run(seqs)])


def train_query_router(engine: Engine, forcer: Forcer, task: Task, problems: List[Problem],
                       max_tokens: int = 128) -> QueryRouter:
    outs = engine.generate([p.prompt for p in problems], SamplingParams(max_tokens=max_tokens, policy="slm"))
    y = torch.tensor([float(task.check(o.text, p)) for o, p in zip(outs, problems)])
    x = prompt_features(forcer, engine.tokenizer, [p.prompt for p in problems])
    lin = _fit_logistic(x, y, epochs=60, desc="query router")
    return QueryRouter(lin, {"n_train": len(problems), "slm_right_share": float(y.mean())})


def colm_marginal_nll(keep_logit: torch.Tensor, slm_logp: torch.Tensor, llm_logp: torch.Tensor) -> torch.Tensor:
    """Co-LLM's objective: -log P(gold token) with the deferral Z latent, mean over positions:
    P = P(keep) p_slm(gold) + P(defer) p_llm(gold), P(keep) = sigmoid(keep_logit). Per position
    its optimum is the weak label; through a head that cannot fit every position it weighs
    them by how much likelihood is at stake (an SLM mistake the LLM fixes) instead of equally
    (two near-certain models that differ in the third decimal)."""
    F = torch.nn.functional
    return -torch.logaddexp(F.logsigmoid(keep_logit) + slm_logp, F.logsigmoid(-keep_logit) + llm_logp).mean()


def colm_positions(forcer: Forcer, tokenizer, problems: List[Problem]):
    """Teacher-forced gold solutions -> (h [N, H], slm_logp [N], llm_logp [N]): each model's
    log-probability of the gold next token."""
    seqs, starts = reference_sequences(tokenizer, problems)
    hs, slm, llm = [], [], []
    for seq, start, f in zip(seqs, starts, forcer.run(seqs)):
        pos = torch.arange(start - 1, len(seq) - 1)
        hs.append(f.hidden[pos])
        slm.append(f.slm_logp_next[pos])
        llm.append(f.llm_logp_next[pos])
    return torch.cat(hs), torch.cat(slm), torch.cat(llm)


def train_colm_head(forcer: Forcer, tokenizer, problems: List[Problem], epochs: int = 20,
                    seed: int = 0) -> LinearRouter:
    return fit_colm_head(*colm_positions(forcer, tokenizer, problems), epochs=epochs, seed=seed)


def fit_colm_head(x: torch.Tensor, slm_logp: torch.Tensor, llm_logp: torch.Tensor, epochs: int = 20,
                  lr: float = 3e-3, seed: int = 0) -> LinearRouter:
    """Weak-label logistic fit, then the marginal likelihood (colm_marginal_nll) from there, on
    standardized features (a real model's normed hidden state has a norm in the hundreds, and a
    head fit on it raw drove its logits past float32's sigmoid range), folded back at the end."""
    y = (llm_logp <= slm_logp).float()  # weak label: 1 = keep the SLM's token
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mu) / sd
    head = LinearRouter(x.shape[1])
    head.linear = _fit_logistic(x, y, epochs=epochs, lr=lr, seed=seed, desc="Co-LLM head (weak labels)")
    head.train()
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    nll = lambda idx: colm_marginal_nll(head(x[idx]), slm_logp[idx], llm_logp[idx])  # noqa: E731
    with torch.no_grad():
        before = float(nll(slice(None)))
    for _ in tqdm(range(epochs), desc="Co-LLM head (marginal likelihood)", leave=False):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 256):
            loss = nll(perm[i:i + 256])
            opt.zero_grad()
            loss.backward()
            opt.step()
    head.eval()
    with torch.no_grad():
        after, keep = float(nll(slice(None))), torch.sigmoid(head(x))
        w = head.linear.weight / sd  # w . (h - mu) / sd + b  ==  (w / sd) . h + (b - (w / sd) . mu)
        head.linear.bias -= w @ mu
        head.linear.weight.copy_(w)
    # Its P(keep) is calibrated to the likelihood, not to a share: where the LLM is much the
    # stronger model it lies under 0.1 almost everywhere, so a fixed τ grid defers everything.
    # The evaluation sweeps these τ instead: the scores' quantiles at these deferral shares.
    shares = torch.tensor(COLM_SWEEP_SHARES + (COLM_DEFAULT_SHARE,), dtype=torch.float64)
    sample = keep.double()[torch.randperm(len(keep), generator=g)[:1 << 22]]  # torch.quantile takes <= 16M
    *taus, default = torch.quantile(sample, shares).tolist()
    head.meta = {"labels": len(y), "weak_defer_share": float(1 - y.mean()), "objective": "marginal likelihood",
                 "nll_weak_init": before, "nll": after, "defer_share_at_0.5": float((keep < 0.5).float().mean()),
                 "sweep_taus": sorted(set(taus)),  # scores saturated in float32 give equal quantiles
                 "default_threshold": default, "default_threshold_share": COLM_DEFAULT_SHARE}
    return head


def save_colm_head(head: LinearRouter, path: str, **meta) -> None:
    """Its router folder, with the τ that defers COLM_DEFAULT_SHARE of the training positions as
    the default (0.5 would defer nearly all of them: its P(keep) is calibrated to likelihood)."""
    save_router(head, path, default_threshold=head.meta["default_threshold"], meta={**meta, **head.meta})


def train_baselines(slm: str, llm: str, task: Task, out: str, n_train: int = 3000, seed: int = 0,
                    max_tokens: int = 128, only: Optional[str] = None) -> dict:
    """Both baselines (or `only` "query" / "colm") on training problems drawn like the
    router's (seed + 777 stream)."""
    problems = task.train_problems(n_train, np.random.default_rng(seed + 777))
    engine = Engine(slm, llm, max_model_len=256, max_num_seqs=256, num_blocks=256 * 16)
    forcer = Forcer(slm, llm, dtype=engine.args.dtype, vocab_limit=engine.core.vocab_limit)
    info = {}
    if only in (None, "query"):
        query = train_query_router(engine, forcer, task, problems, max_tokens)
        query.meta["seed"] = seed  # with n_train: its problems, for evaluation's leakage check (fresh_problems)
        query.save(os.path.join(out, "query"))
        info["query"] = query.meta
    if only in (None, "colm"):
        colm = train_colm_head(forcer, engine.tokenizer, problems, seed=seed)
        save_colm_head(colm, os.path.join(out, "colm"), task=task.name, n_train=n_train, seed=seed)
        info["colm"] = colm.meta
    print(json.dumps(info))
    return info


def train_baselines_on_positions(slm: str, llm: str, task: Task, out: str, n_train: int, seed: int = 0,
                                 dtype: str = "float32", max_len: int = 256, cache: Optional[str] = None,
                                 only: Optional[str] = None) -> dict:
    """Both baselines (or `only` one) on data without a checker (see the module doc), on the
    training problems train_router drew (same seed stream, same cached positions)."""
    from citer.research.training.positions import force_positions, sequences

    problems = task.train_problems(n_train, np.random.default_rng(seed + 777))
    engine = Engine(slm, llm, dtype=dtype, max_model_len=max_len + 8, max_num_seqs=64)
    forcer = Forcer.from_engine(engine)
    tok = engine.tokenizer
    with_ref = [p for p in problems if p.solution]
    seqs, starts, kept = sequences(tok, with_ref, max_len)
    pos = force_positions(forcer, seqs, starts, gold=True, desc="teacher forcing train references",
                          cache=os.path.join(cache, "train-references") if cache else None)
    info = {}
    if only in (None, "colm"):
        colm = fit_colm_head(pos.hidden, pos.slm_logp, pos.llm_logp, seed=seed)
        save_colm_head(colm, os.path.join(out, "colm"), task=task.name, n_train=n_train, seed=seed,
                       n_sequences=len(seqs))  # n_train problems drawn (fresh_problems redraws them), these fit
        info["colm"] = colm.meta
    if only in (None, "query"):
        info["query"] = _query_on_positions(forcer, tok, task, pos, [with_ref[i].prompt for i in kept],
                                            os.path.join(out, "query"), dict(n_train=n_train, seed=seed))
    print(json.dumps(info))
    return info


def _query_on_positions(forcer: Forcer, tok, task: Task, pos, prompts: List[str], out: str, drawn: dict) -> dict:
    """The query router's label here: the SLM agrees with the LLM on at least the median share
    of a query's reference positions (pos.seq indexes `prompts`)."""
    agree = torch.zeros(len(prompts))
    agree.index_add_(0, pos.seq, (pos.slm_pred == pos.llm_pred).float())
    rate = agree / torch.bincount(pos.seq, minlength=len(prompts)).clamp_min(1).float()
    y = (rate >= rate.median()).float()
    x = prompt_features(forcer, tok, prompts)
    lin = _fit_logistic(x, y, epochs=60, desc="query router")
    meta = {"task": task.name, **drawn, "n_prompts": len(prompts), "label": "agreement rate >= median",
            "median_agreement": float(rate.median())}
    QueryRouter(lin, meta).save(out)
    return meta
