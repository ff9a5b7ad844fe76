"""The head step: final norm + lm_head + token choice (+ router score) for a batch.

On the Triton backend, batches of greedy / plain temperature rows go through
ops.routed_head (one pass over the lm_head weight, no [B, vocab] logits). Otherwise the
logits come from the model (its transposed lm_head copy on CPU) and the same choices are
made from them (head_from_logits); rows with top-k / top-p need that whole logits row.
Both paths draw
temperature samples with the Gumbel-max trick from a per-step seed that each sequence's
own generator provides, so a seeded request gives the same tokens in any batch.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence as Seq, Tuple

import torch

from citer.kernels.routed_head import gumbel_noise, head_from_logits, router_mlp_ref


@dataclass
class HeadOutput:
    tokens: List[int]
    top_prob: torch.Tensor  # [B] float32: the model's max softmax probability
    router_score: torch.Tensor  # [B] float32; nan where no router ran


def sampling_inputs(seqs: Seq) -> Tuple[List[float], List[int]]:
    """Per row: temperature (0 = greedy) and this step's sampling seed (drawn from each
    sequence's own generator, once per step; 0 for greedy rows)."""
    temperature = [s.params.temperature for s in seqs]
    seeds = [0 if s.params.greedy else s.next_sampling_seed() for s in seqs]
    return temperature, seeds


def needs_full_logits(seqs: Seq) -> bool:
    """True when some row filters its distribution (top-k / top-p): the fused head cannot."""
    return any(s.params.filtered for s in seqs)


def run_head(ops, model, hidden: torch.Tensor, seqs: Seq, vocab_limit: int,
             router: Optional[Tuple[torch.Tensor, ...]] = None,
             inputs: Optional[Tuple[List[float], List[int]]] = None) -> HeadOutput:
    """hidden [B, H] (pre-final-norm, one row per sequence) -> tokens, top_prob, router score.
    inputs: this step's sampling_inputs(seqs), when already drawn."""
    device = hidden.device
    params = [s.params for s in seqs]
    temps, seed_list = inputs if inputs is not None else sampling_inputs(seqs)
    temperature = torch.tensor(temps, dtype=torch.float32, device=device)
    seeds = torch.tensor(seed_list, dtype=torch.int64, device=device)
    full_logits = needs_full_logits(seqs)
    if ops.name == "triton" and not full_logits:
        tokens, top_prob, score = ops.routed_head(hidden, model.norm.weight, model.norm.eps,
                                                  model.lm_head.weight[:vocab_limit], router, temperature, seeds)
        return HeadOutput(tokens.tolist(), top_prob, score)
    h = model.final_norm(ops, hidden)
    logits = model.logits_from_normed(h)[:, :vocab_limit]
    if not full_logits:
        tokens, top_prob, score = head_from_logits(logits, h, router, temperature, seeds)
        return HeadOutput(tokens.tolist(), top_prob, score)
    top_prob = torch.softmax(logits, dim=-1).amax(dim=-1)
    score = router_mlp_ref(h, *router) if router is not None else torch.full_like(top_prob, float("nan"))
    tokens = [sample_row(logits[b], p, int(seeds[b])) for b, p in enumerate(params)]
    return HeadOutput(tokens, top_prob, score)


def sample_row(logits: torch.Tensor, params, seed: int) -> int:
    """logits [V] float32 -> token id under params (greedy, temperature, top-k, top-p)."""
    if params.greedy:
        return int(logits.argmax())
    scaled = logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < scaled.numel():
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= params.top_p  # keep the first
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    noise = gumbel_noise(seed, scaled.numel()).to(scaled.device)
    return int((scaled + noise).argmax())
