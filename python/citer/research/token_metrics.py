"""Token-level ranking metrics of a routing score against the SLM's mistakes.

A score ranks positions from "send to the LLM" (low) to "keep the SLM's token" (high).
`recall_at_budgets`: of the positions that should go to the LLM (label 0), the share
among the lowest-scored `budget` fraction of all positions (ties broken by position, so
a constant score is no better than its order). `auroc`: the probability that a random
mistake scores below a random non-mistake (ties count half), the Mann-Whitney statistic.
"""
from typing import Dict, Sequence

import torch

BUDGETS = (0.01, 0.02, 0.05, 0.10)


def recall_at_budgets(score: torch.Tensor, label: torch.Tensor, budgets: Sequence[float] = BUDGETS,
                      weight: torch.Tensor = None) -> Dict[float, float]:
    """score, label (1 = the SLM's token is fine) [N]; weight [N] (mining weights) or None."""
    w = torch.ones_like(score) if weight is None else weight.float()
    order = torch.argsort(score.float(), stable=True)
    neg = (label[order] < 0.5).float() * w[order]
    spent = torch.cumsum(w[order], 0)
    total, caught = float(w.sum()), torch.cumsum(neg, 0)
    n_neg = float(neg.sum())
    out = {}
    for b in budgets:
        k = int(torch.searchsorted(spent, torch.tensor(b * total), right=True))
        out[b] = float(caught[k - 1]) / n_neg if k > 0 and n_neg > 0 else 0.0
    return out


def routing_objective(score: torch.Tensor, label: torch.Tensor, weight: torch.Tensor = None,
                      budgets: Sequence[float] = BUDGETS) -> float:
    """The mean recall of mistakes over the budgets: what checkpoint selection maximises."""
    r = recall_at_budgets(score, label, budgets, weight)
    return sum(r.values()) / len(r)


def auroc(score: torch.Tensor, label: torch.Tensor) -> float:
    """P(score of a mistake < score of a non-mistake); ties count half."""
    score = score.double()
    neg, pos = label < 0.5, label >= 0.5
    n0, n1 = int(neg.sum()), int(pos.sum())
    if n0 == 0 or n1 == 0:
        return float("nan")
    # average ranks (ties share their mean rank), then Mann-Whitney U of the positives
    sorted_s, order = torch.sort(score)
    ranks = torch.empty_like(score)
    uniq, inverse, counts = torch.unique_consecutive(sorted_s, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    ranks[order] = mean_rank[inverse]
    u = float(ranks[pos].sum()) - n1 * (n1 + 1) / 2
    return u / (n0 * n1)
