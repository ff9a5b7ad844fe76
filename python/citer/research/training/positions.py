"""Teacher-forced positions, computed once and cached on disk, and the labels read off them.

Router training at real-model cost is dominated by the two models' forward passes over
the training sequences. `force_positions` runs them once (citer's own models, the
engine's dtype: training.forcing.Forcer) and keeps, per position that predicts a
completion token, what every label scheme needs: the SLM's normed hidden state and head
signals (the router's input, as the engine computes it), the SLM's and the LLM's greedy
tokens, the gold token (the reference's, -1 on a model's own trajectory) and each model's
log-probability of the sequence's next token (Co-LLM's objective, on references). Chunks
are written to a cache folder as they finish, so an interrupted run resumes where it
stopped and a second label scheme (CITER-S beside CITER) costs no forward pass; a chunk
cached before the log-probabilities were kept is computed again and rewritten.

Label schemes (`labels_of`), per position:
  llm-agreement  1 where the SLM's greedy token is the LLM's, else 0 (distillation: no
                 reference or checker needed; on references and on trajectories)
  short-term     CITER-S: 1 where the SLM's greedy token is the gold one, 0 where only
                 the LLM's is, and 0 where both are wrong (no rollout)
"""
import hashlib
import json
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

SCHEMES = ("llm-agreement", "short-term")


@dataclass
class Positions:
    hidden: torch.Tensor  # [N, H] float32: the SLM's normed final hidden state
    signals: torch.Tensor  # [N, NUM_SIGNALS]
    slm_pred: torch.Tensor  # [N] int64
    llm_pred: torch.Tensor  # [N] int64
    gold: torch.Tensor  # [N] int64: the reference's token, -1 where there is none
    seq: torch.Tensor  # [N] int64: which sequence (index into the list forced)
    slm_logp: torch.Tensor  # [N] float32: the SLM's log-probability of the sequence's next token
    llm_logp: torch.Tensor  # [N] float32: the LLM's

    def __len__(self) -> int:
        return len(self.gold)

    @classmethod
    def cat(cls, parts: Sequence["Positions"]) -> "Positions":
        return cls(*(torch.cat([getattr(p, f) for p in parts]) for f in cls.__dataclass_fields__))


def reference_ids(tokenizer, problem) -> Tuple[List[int], int]:
    """(prompt + reference + EOS token ids, where the reference starts). The prompt's ids are the
    engine's (the prompt tokenized alone); the reference follows as tokenized together with the
    prompt where that keeps the prompt's ids a prefix, else tokenized alone where that spells
    the same text: a BPE merge across the boundary would give the first reference tokens a
    context inference never has."""
    prompt = tokenizer(problem.prompt).input_ids
    full = tokenizer(problem.prompt + problem.solution).input_ids
    if full[:len(prompt)] != prompt:
        apart = prompt + tokenizer(problem.solution, add_special_tokens=False).input_ids
        if tokenizer.decode(apart) == tokenizer.decode(full):  # not where the reference alone gains a
            full = apart  # leading space (SentencePiece's "▁"): the joint ids then, as before
    return full + [tokenizer.eos_token_id], len(prompt)


def reference_sequences(tokenizer, problems) -> Tuple[List[List[int]], List[int]]:
    """reference_ids of every problem -> (sequences, starts)."""
    pairs = [reference_ids(tokenizer, p) for p in problems]
    return [full for full, _ in pairs], [start for _, start in pairs]


def sequences(tokenizer, problems, max_len: int) -> Tuple[List[List[int]], List[int], List[int]]:
    """(prompt + reference + EOS) token ids and each one's completion start, for the problems
    that fit max_len tokens; -> (sequences, starts, indices of the problems kept)."""
    every, begins = reference_sequences(tokenizer, problems)
    kept = [i for i, (full, start) in enumerate(zip(every, begins)) if start < len(full) <= max_len]
    return [every[i] for i in kept], [begins[i] for i in kept], kept


def force_positions(forcer, seqs: List[List[int]], starts: List[int], gold: bool, cache: Optional[str] = None,
                    chunk: int = 64, desc: str = "teacher forcing") -> Positions:
    """Both models over each sequence; positions [starts[i] - 1, len - 1) (those predicting
    tokens starts[i] .. len - 1). gold: the sequence's own tokens are the gold ones (a
    reference), else gold is -1 (a model's own trajectory). cache: a folder for the chunks."""
    if cache:
        os.makedirs(cache, exist_ok=True)
    parts = []
    for c in tqdm(range(0, len(seqs), chunk), desc=desc, unit="chunk"):
        part_seqs, part_starts = seqs[c:c + chunk], starts[c:c + chunk]
        fn = None
        if cache:
            # the models too: a run with another pair (or retrained weights) into the same folder recomputes
            key = hashlib.sha1(json.dumps([part_seqs, part_starts, gold, forcer.fingerprint]).encode()).hexdigest()[:16]
            fn = os.path.join(cache, f"{c // chunk:05d}-{key}.pt")
            if os.path.isfile(fn):
                cached = torch.load(fn)
                if cached.keys() == Positions.__dataclass_fields__.keys():  # else: an older format, redone
                    parts.append(Positions(**cached))
                    continue
        part = _force(forcer, part_seqs, part_starts, gold, c)
        if fn:
            torch.save(part.__dict__, fn + ".tmp")
            os.replace(fn + ".tmp", fn)
        parts.append(part)
    return Positions.cat(parts) if parts else None


def _force(forcer, seqs, starts, gold: bool, first: int) -> Positions:
    forced = forcer.run(seqs, starts=starts)
    h, sig, sp, lp, g, which, slp, llp = [], [], [], [], [], [], [], []
    for i, (s, start, f) in enumerate(zip(seqs, starts, forced)):
        n = len(s) - start  # rows predicting tokens start .. len - 1 (the Forced's last row predicts nothing)
        h.append(f.hidden[:n])
        sig.append(f.signals[:n])
        sp.append(f.slm_pred[:n])
        lp.append(f.llm_pred[:n])
        g.append(torch.tensor(s[start:]) if gold else torch.full((n,), -1, dtype=torch.long))
        which.append(torch.full((n,), first + i, dtype=torch.long))
        slp.append(f.slm_logp_next[:n])
        llp.append(f.llm_logp_next[:n])
    return Positions(*(torch.cat(t) for t in (h, sig, sp, lp, g, which, slp, llp)))


def labels_of(pos: Positions, scheme: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """-> (hidden, signals, labels [N] float, label counts) of one scheme."""
    if scheme == "llm-agreement":
        y = (pos.slm_pred == pos.llm_pred).float()
        return pos.hidden, pos.signals, y, {"agree": int(y.sum()), "disagree": int(len(y) - y.sum())}
    if scheme == "short-term":
        keep = pos.gold >= 0
        slm_ok = (pos.slm_pred == pos.gold)[keep]
        llm_ok = (pos.llm_pred == pos.gold)[keep] & ~slm_ok
        y = slm_ok.float()
        return pos.hidden[keep], pos.signals[keep], y, {"slm_right": int(slm_ok.sum()), "llm_right": int(llm_ok.sum()),
                                                        "both_wrong": int((~slm_ok & ~llm_ok).sum())}
    raise ValueError(f"unknown label scheme {scheme!r}; choose one of {SCHEMES}")
