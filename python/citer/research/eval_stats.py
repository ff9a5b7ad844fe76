"""Bootstrap statistics of accuracy-vs-LLM-share curves (problems resampled).

A point is one setting's per-problem results: correct [N] bool, tokens [N], llm_tokens
[N]. A curve is a method's points; every curve also holds (0, SLM-only accuracy) and
(1, LLM-only accuracy), since any method reaches a mixture of its own point and LLM-only
by sending some queries wholly to the LLM. Per bootstrap resample of the problems:

  - accuracy and LLM share of each point;
  - the share a curve needs to reach LLM-only accuracy minus `gap` (linear interpolation
    along the curve sorted by share; the first crossing);
  - the mean accuracy over shares 0-`max_share` (the area under the curve there, / max_share)
    and its difference between two curves.
Intervals are the 2.5 / 97.5 percentiles.
"""
from typing import Dict, List, Sequence

import numpy as np

GRID = 201


class Bootstrap:
    def __init__(self, n_problems: int, n_boot: int = 1000, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.idx = rng.integers(0, n_problems, size=(n_boot, n_problems))  # [B, N]

    def point(self, p: Dict) -> Dict[str, np.ndarray]:
        """-> accuracy [B], share [B] of one point under every resample."""
        c, t, lt = (np.asarray(p[k], dtype=np.float64) for k in ("correct", "tokens", "llm_tokens"))
        acc = c[self.idx].mean(1)
        share = lt[self.idx].sum(1) / np.maximum(t[self.idx].sum(1), 1)
        return {"accuracy": acc, "share": share}

    def curve(self, points: List[Dict], slm: Dict, llm: Dict) -> Dict[str, np.ndarray]:
        """-> shares [B, P+2], accuracies [B, P+2] sorted by share per resample."""
        pts = [self.point(p) for p in points]
        s_acc, l_acc = self.point(slm)["accuracy"], self.point(llm)["accuracy"]
        b = len(s_acc)
        shares = np.stack([np.zeros(b)] + [p["share"] for p in pts] + [np.ones(b)], 1)
        accs = np.stack([s_acc] + [p["accuracy"] for p in pts] + [l_acc], 1)
        order = np.argsort(shares, axis=1, kind="stable")
        return {"share": np.take_along_axis(shares, order, 1), "accuracy": np.take_along_axis(accs, order, 1),
                "llm_accuracy": l_acc}


def share_to_reach(curve: Dict[str, np.ndarray], gap: float = 0.01) -> np.ndarray:
    """[B]: the first share where the curve reaches LLM accuracy - gap (1.0 if only at LLM-only)."""
    s, a = curve["share"], curve["accuracy"]
    target = curve["llm_accuracy"] - gap - 1e-12
    out = np.ones(len(s))
    for b in range(len(s)):
        hit = np.nonzero(a[b] >= target[b])[0]
        j = hit[0] if len(hit) else len(a[b]) - 1
        if j == 0:
            out[b] = s[b, 0]
            continue
        a0, a1, s0, s1 = a[b, j - 1], a[b, j], s[b, j - 1], s[b, j]
        out[b] = s1 if a1 == a0 else s0 + (target[b] - a0) / (a1 - a0) * (s1 - s0)
    return out


def mean_accuracy(curve: Dict[str, np.ndarray], max_share: float = 0.2) -> np.ndarray:
    """[B]: the curve's mean accuracy over shares [0, max_share] (piecewise linear)."""
    grid = np.linspace(0.0, max_share, GRID)
    return np.array([np.interp(grid, s, a).mean() for s, a in zip(curve["share"], curve["accuracy"])])


def interval(x: np.ndarray) -> List[float]:
    return [float(np.percentile(x, 2.5)), float(np.percentile(x, 97.5))]


def summarize(curves: Dict[str, Dict[str, np.ndarray]], reference: str = "confidence", gap: float = 0.01,
              max_share: float = 0.2) -> Dict[str, Dict]:
    """Per method: share to reach LLM - gap, mean accuracy over 0-max_share, and the
    difference of the latter to `reference` (positive: above it), each with its interval."""
    area = {m: mean_accuracy(c, max_share) for m, c in curves.items()}
    out = {}
    for m, c in curves.items():
        reach = share_to_reach(c, gap)
        row = {"share_to_reach": float(np.median(reach)), "share_to_reach_ci": interval(reach),
               "mean_accuracy_0_20": float(np.median(area[m])), "mean_accuracy_0_20_ci": interval(area[m])}
        if reference in area and m != reference:
            d = area[m] - area[reference]
            row[f"area_minus_{reference}"] = float(np.median(d))
            row[f"area_minus_{reference}_ci"] = interval(d)
            row[f"p_below_{reference}"] = float((d < 0).mean())
        out[m] = row
    return out


def point_intervals(boot: Bootstrap, p: Dict) -> Dict[str, Sequence[float]]:
    r = boot.point(p)
    return {"accuracy_ci": interval(r["accuracy"]), "llm_share_ci": interval(r["share"])}
