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
All rollouts are batched through the engine, never token by token in Python.
The router's input is the SLM's final normed hidden state at the position that predicts
token t, exactly what the engine feeds it at inference.
"""
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch

from citer import Engine, SamplingParams
from citer.tasks import Problem, Task


@dataclass
class LabelSet:
    features: List[torch.Tensor] = field(default_factory=list)  # [N_i, H] chunks
    labels: List[torch.Tensor] = field(default_factory=list)  # [N_i] float chunks
    cases: dict = field(default_factory=lambda: {"slm_right": 0, "llm_right": 0, "rollout_1": 0,
                                                 "rollout_0": 0, "on_policy_1": 0, "on_policy_0": 0})

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if len(y):
            self.features.append(x.float().cpu())
            self.labels.append(y.float().cpu())

    def tensors(self):
        return torch.cat(self.features), torch.cat(self.labels)


class TeacherForcer:
    """Runs both models (transformers, fp32) over whole sequences: per position the SLM's
    normed final hidden state and greedy token, and the LLM's greedy token."""

    def __init__(self, slm_path: str, llm_path: str, batch_size: int = 64):
        from transformers import AutoModelForCausalLM

        self.slm = AutoModelForCausalLM.from_pretrained(slm_path, dtype=torch.float32).eval()
        self.llm = AutoModelForCausalLM.from_pretrained(llm_path, dtype=torch.float32).eval()
        self.batch_size = batch_size

    @torch.inference_mode()
    def run(self, seqs: List[List[int]]):
        """-> per sequence (slm_hidden [L, H], slm_pred [L], llm_pred [L]); row p predicts token p+1."""
        out = []
        for i in range(0, len(seqs), self.batch_size):
            chunk = seqs[i: i + self.batch_size]
            L = max(len(s) for s in chunk)
            ids = torch.zeros(len(chunk), L, dtype=torch.long)
            mask = torch.zeros(len(chunk), L, dtype=torch.long)
            for j, s in enumerate(chunk):
                ids[j, : len(s)] = torch.tensor(s)
                mask[j, : len(s)] = 1
            h = self.slm.model(input_ids=ids, attention_mask=mask).last_hidden_state  # after the final norm
            slm_pred = self.slm.lm_head(h).argmax(-1)
            llm_pred = self.llm(input_ids=ids, attention_mask=mask).logits.argmax(-1)
            for j, s in enumerate(chunk):
                n = len(s)
                out.append((h[j, :n], slm_pred[j, :n], llm_pred[j, :n]))
        return out


def _rollouts(engine: Engine, task: Task, prefixes: List[List[int]], problems: List[Problem],
              policy: str, threshold: Optional[float], max_tokens: int) -> np.ndarray:
    """Continue each prefix to the end -> 1 where the final answer is right."""
    if not prefixes:
        return np.zeros(0, dtype=bool)
    tok = engine.tokenizer
    params = SamplingParams(max_tokens=max_tokens, policy=policy, threshold=threshold)
    outs = engine.generate(prefixes, params)
    right = []
    for prefix, out, prob in zip(prefixes, outs, problems):
        text = tok.decode(prefix, skip_special_tokens=True) + out.text
        right.append(task.check(text.split(" A:", 1)[-1], prob))
    return np.array(right, dtype=bool)


def gold_labels(engine: Engine, forcer: TeacherForcer, task: Task, problems: List[Problem],
                router_threshold: Optional[float] = None, short_term: bool = False,
                max_tokens: int = 128, into: Optional[LabelSet] = None) -> LabelSet:
    """Labels on teacher-forced gold solutions. router_threshold None: round 1 (SLM rollouts);
    else case-3 rollouts run with the engine's router in the loop at that threshold."""
    out = into or LabelSet()
    tok = engine.tokenizer
    seqs, starts = [], []
    for p in problems:
        prompt = tok(p.prompt).input_ids
        full = tok(p.prompt + p.solution).input_ids + [tok.eos_token_id]
        seqs.append(full)
        starts.append(len(prompt))
    forced = forcer.run(seqs)
    pending_x, pending_prefix, pending_prob = [], [], []
    for seq, start, prob, (h, slm_pred, llm_pred) in zip(seqs, starts, problems, forced):
        # position p-1 predicts gold token p, for every solution token p in [start, len)
        pos = torch.arange(start - 1, len(seq) - 1)
        gold = torch.tensor(seq[start:])
        slm_ok = slm_pred[pos] == gold
        llm_ok = (llm_pred[pos] == gold) & ~slm_ok
        both_wrong = ~slm_ok & ~llm_ok
        out.cases["slm_right"] += int(slm_ok.sum())
        out.cases["llm_right"] += int(llm_ok.sum())
        keep = slm_ok | llm_ok
        out.add(h[pos[keep]], slm_ok[keep].float())
        if short_term:
            out.add(h[pos[both_wrong]], torch.zeros(int(both_wrong.sum())))
            out.cases["rollout_0"] += int(both_wrong.sum())
            continue
        for i in torch.nonzero(both_wrong).flatten().tolist():
            p = int(pos[i])
            pending_x.append(h[p])
            pending_prefix.append(seq[: p + 1] + [int(slm_pred[p])])
            pending_prob.append(prob)
    if pending_prefix:
        policy = "slm" if router_threshold is None else "router"
        right = _rollouts(engine, task, pending_prefix, pending_prob, policy, router_threshold, max_tokens)
        out.add(torch.stack(pending_x), torch.from_numpy(right).float())
        out.cases["rollout_1"] += int(right.sum())
        out.cases["rollout_0"] += int((~right).sum())
    return out


def on_policy_labels(engine: Engine, forcer: TeacherForcer, task: Task, problems: List[Problem],
                     threshold: float, max_tokens: int = 128, into: Optional[LabelSet] = None) -> LabelSet:
    """Labels on trajectories the routed system itself produced (see the module doc)."""
    out = into or LabelSet()
    gens = engine.generate([p.prompt for p in problems],
                           SamplingParams(max_tokens=max_tokens, policy="router", threshold=threshold))
    seqs = [g.prompt_token_ids + g.token_ids for g in gens]
    forced = forcer.run(seqs)
    agree_x, branch_x, slm_branch, llm_branch, branch_prob = [], [], [], [], []
    for g, seq, prob, (h, slm_pred, llm_pred) in zip(gens, seqs, problems, forced):
        start = len(g.prompt_token_ids)
        pos = torch.arange(start - 1, len(seq) - 1)
        same = slm_pred[pos] == llm_pred[pos]
        agree_x.append(h[pos[same]])
        for i in torch.nonzero(~same).flatten().tolist():
            p = int(pos[i])
            branch_x.append(h[p])
            slm_branch.append(seq[: p + 1] + [int(slm_pred[p])])
            llm_branch.append(seq[: p + 1] + [int(llm_pred[p])])
            branch_prob.append(prob)
    if agree_x:
        x = torch.cat(agree_x)
        out.add(x, torch.ones(len(x)))
        out.cases["on_policy_1"] += len(x)
    if branch_x:
        s_right = _rollouts(engine, task, slm_branch, branch_prob, "router", threshold, max_tokens)
        l_right = _rollouts(engine, task, llm_branch, branch_prob, "router", threshold, max_tokens)
        informative = s_right | l_right
        x = torch.stack(branch_x)[torch.from_numpy(informative)]
        y = torch.from_numpy(s_right[informative]).float()
        out.add(x, y)
        out.cases["on_policy_1"] += int(y.sum())
        out.cases["on_policy_0"] += int((1 - y).sum())
    return out
