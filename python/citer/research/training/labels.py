"""CITER's shortcut-reward labels for router training.

Round 1, on teacher-forced gold solutions, for each solution position t (gold token y_t):
  1. the SLM's greedy token == y_t                 -> label 1 (the SLM's token is fine)
  2. else the LLM's greedy token == y_t            -> label 0 (prefer the LLM)
  3. else (both wrong) roll out from the prefix with the SLM's token, to the end, and
     label by whether the final answer is right (1 right, 0 wrong).
  With short_term=True (the CITER-S ablation) case 3 is labelled 0 with no rollout.

Round r >= 2 (with the current router in the loop):
  - case-3 positions are relabelled by rolling out with the routed system (policy
    "router") instead of the SLM alone;
  - on-policy positions: the routed system generates answers to training prompts; at every
    position of those trajectories where the SLM's and the LLM's greedy tokens differ,
    both branches are rolled out with the router in the loop; label 1 if the SLM's branch
    ends right, else 0 if the LLM's branch does (positions where neither branch is right
    carry no signal and are skipped); where the two models agree the label is 1. This
    trains the router on prefixes the routed system itself produces, which the reference
    code never does.
With labels="llm-agreement" (R2R-style, the token-match oracle's rule) a position is
labelled 1 where the SLM's greedy token equals the LLM's on the same prefix, else 0, on
the gold prefixes (round 1) and on the routed system's own trajectories (later rounds);
no rollouts.

Hard-case mining (easy_keep < 1): positions where the SLM's top probability is at least
EASY_TOP_PROB (where no threshold in use sends anything to the LLM) are kept at the rate
easy_keep with weight 1 / easy_keep, every other position with weight 1: the loss stays
an unbiased estimate of the full one while most of the rows are where decisions are made.

All rollouts are batched through the engine, never token by token in Python.
The router's input is the SLM's final normed hidden state at the position that predicts
token t and the head's signals of its logits there, exactly what the engine feeds it at
inference.
"""
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch

from citer import Engine, SamplingParams
from citer.research.tasks import Problem, Task

from .forcing import Forcer
from .positions import reference_sequences

LABELS = ("gold", "llm-agreement")
EASY_TOP_PROB = 0.99


@dataclass
class LabelSet:
    features: List[torch.Tensor] = field(default_factory=list)  # [N_i, H] chunks
    signals: List[torch.Tensor] = field(default_factory=list)  # [N_i, NUM_SIGNALS] chunks
    labels: List[torch.Tensor] = field(default_factory=list)  # [N_i] float chunks
    weights: List[torch.Tensor] = field(default_factory=list)  # [N_i] float chunks
    cases: dict = field(default_factory=lambda: {"slm_right": 0, "llm_right": 0, "rollout_1": 0,
                                                 "rollout_0": 0, "on_policy_1": 0, "on_policy_0": 0,
                                                 "agree": 0, "disagree": 0, "easy_dropped": 0})
    easy_keep: float = 1.0  # hard-case mining: the rate easy positions are kept at
    seed: int = 0

    def __post_init__(self):
        self._rng = torch.Generator().manual_seed(self.seed)

    def add(self, x: torch.Tensor, sig: torch.Tensor, y: torch.Tensor) -> None:
        if not len(y):
            return
        w = torch.ones(len(y))
        if self.easy_keep < 1.0:
            easy = torch.sigmoid(sig[:, 0]) >= EASY_TOP_PROB
            keep = ~easy | (torch.rand(len(y), generator=self._rng) < self.easy_keep)
            w = torch.where(easy, 1.0 / self.easy_keep, 1.0)[keep]
            self.cases["easy_dropped"] += int((~keep).sum())
            x, sig, y = x[keep], sig[keep], y[keep]
        self.features.append(x.float().cpu())
        self.signals.append(sig.float().cpu())
        self.labels.append(y.float().cpu())
        self.weights.append(w)

    def tensors(self):
        """-> (hidden [N, H], signals [N, NUM_SIGNALS], labels [N], weights [N])."""
        return (torch.cat(self.features), torch.cat(self.signals), torch.cat(self.labels),
                torch.cat(self.weights))

    def __len__(self) -> int:
        return int(sum(len(y) for y in self.labels))


def _rollouts(engine: Engine, task: Task, prefixes: List[List[int]], problems: List[Problem],
              policy: str, threshold: Optional[float], max_tokens: int) -> np.ndarray:
    """Continue each prefix to the end -> 1 where the final answer is right."""
    if not prefixes:
        return np.zeros(0, dtype=bool)
    tok = engine.tokenizer
    params = SamplingParams(max_tokens=max_tokens, policy=policy, threshold=threshold)
    outs = engine.generate(prefixes, task.sampling_params(problems, params))  # the task's stop strings, as in eval
    right = []
    for prefix, out, prob in zip(prefixes, outs, problems):
        text = tok.decode(prefix, skip_special_tokens=True) + out.text
        right.append(task.check(text.split(" A:", 1)[-1], prob))
    return np.array(right, dtype=bool)


def gold_labels(engine: Engine, forcer: Forcer, task: Task, problems: List[Problem],
                router_threshold: Optional[float] = None, short_term: bool = False,
                max_tokens: int = 128, into: Optional[LabelSet] = None, labels: str = "gold") -> LabelSet:
    """Labels on teacher-forced gold solutions. router_threshold None: round 1 (SLM rollouts);
    else case-3 rollouts run with the engine's router in the loop at that threshold.
    labels="llm-agreement": 1 where the SLM's greedy token is the LLM's, else 0."""
    if labels not in LABELS:
        raise ValueError(f"unknown labels {labels!r}; choose one of {LABELS}")
    out = into if into is not None else LabelSet()
    tok = engine.tokenizer
    seqs, starts = reference_sequences(tok, problems)
    forced = forcer.run(seqs)
    pending_x, pending_s, pending_prefix, pending_prob = [], [], [], []
    for seq, start, prob, f in zip(seqs, starts, problems, forced):
        # position p-1 predicts gold token p, for every solution token p in [start, len)
        pos = torch.arange(start - 1, len(seq) - 1)
        h, sig = f.hidden[pos], f.signals[pos]
        if labels == "llm-agreement":
            agree = f.slm_pred[pos] == f.llm_pred[pos]
            out.cases["agree"] += int(agree.sum())
            out.cases["disagree"] += int((~agree).sum())
            out.add(h, sig, agree.float())
            continue
        gold = torch.tensor(seq[start:])
        slm_ok = f.slm_pred[pos] == gold
        llm_ok = (f.llm_pred[pos] == gold) & ~slm_ok
        both_wrong = ~slm_ok & ~llm_ok
        out.cases["slm_right"] += int(slm_ok.sum())
        out.cases["llm_right"] += int(llm_ok.sum())
        keep = slm_ok | llm_ok
        out.add(h[keep], sig[keep], slm_ok[keep].float())
        if short_term:
            out.add(h[both_wrong], sig[both_wrong], torch.zeros(int(both_wrong.sum())))
            out.cases["rollout_0"] += int(both_wrong.sum())
            continue
        for i in torch.nonzero(both_wrong).flatten().tolist():
            p = int(pos[i])
            pending_x.append(f.hidden[p])
            pending_s.append(f.signals[p])
            pending_prefix.append(seq[: p + 1] + [int(f.slm_pred[p])])
            pending_prob.append(prob)
    if pending_prefix:
        policy = "slm" if router_threshold is None else "router"
        right = _rollouts(engine, task, pending_prefix, pending_prob, policy, router_threshold, max_tokens)
        out.add(torch.stack(pending_x), torch.stack(pending_s), torch.from_numpy(right).float())
        out.cases["rollout_1"] += int(right.sum())
        out.cases["rollout_0"] += int((~right).sum())
    return out


def on_policy_labels(engine: Engine, forcer: Forcer, task: Task, problems: List[Problem],
                     threshold: float, max_tokens: int = 128, into: Optional[LabelSet] = None,
                     labels: str = "gold") -> LabelSet:
    """Labels on trajectories the routed system itself produced (see the module doc)."""
    out = into if into is not None else LabelSet()
    gens = engine.generate([p.prompt for p in problems], task.sampling_params(
        problems, SamplingParams(max_tokens=max_tokens, policy="router", threshold=threshold)))
    seqs = [g.prompt_token_ids + g.token_ids for g in gens]
    forced = forcer.run(seqs)
    agree_x, agree_s, branch_x, branch_s, slm_branch, llm_branch, branch_prob = [], [], [], [], [], [], []
    for g, seq, prob, f in zip(gens, seqs, problems, forced):
        start = len(g.prompt_token_ids)
        pos = torch.arange(start - 1, len(seq) - 1)
        same = f.slm_pred[pos] == f.llm_pred[pos]
        if labels == "llm-agreement":
            out.add(f.hidden[pos], f.signals[pos], same.float())
            out.cases["agree"] += int(same.sum())
            out.cases["disagree"] += int((~same).sum())
            continue
        agree_x.append(f.hidden[pos[same]])
        agree_s.append(f.signals[pos[same]])
        for i in torch.nonzero(~same).flatten().tolist():
            p = int(pos[i])
            branch_x.append(f.hidden[p])
            branch_s.append(f.signals[p])
            slm_branch.append(seq[: p + 1] + [int(f.slm_pred[p])])
            llm_branch.append(seq[: p + 1] + [int(f.llm_pred[p])])
            branch_prob.append(prob)
    if agree_x:
        x = torch.cat(agree_x)
        out.add(x, torch.cat(agree_s), torch.ones(len(x)))
        out.cases["on_policy_1"] += len(x)
    if branch_x:
        s_right = _rollouts(engine, task, slm_branch, branch_prob, "router", threshold, max_tokens)
        l_right = _rollouts(engine, task, llm_branch, branch_prob, "router", threshold, max_tokens)
        informative = torch.from_numpy(s_right | l_right)
        y = torch.from_numpy(s_right).float()[informative]
        out.add(torch.stack(branch_x)[informative], torch.stack(branch_s)[informative], y)
        out.cases["on_policy_1"] += int(y.sum())
        out.cases["on_policy_0"] += int((1 - y).sum())
    return out
