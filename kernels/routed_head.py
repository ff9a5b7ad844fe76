"""Routed head: final RMSNorm + lm_head + argmax/sample + the router MLP in one pass.

Returns, per row, the SLM's token, the SLM's top probability (softmax of the raw
logits, the "confidence" baseline's signal) and the router score
p = sigmoid(relu(h @ W1.T + b1) @ w2 + b2) on the normed hidden state h (the folded
CITER router; see citer.router). The Triton kernel never materialises [B, vocab]
logits; this reference does, and is what runs on CPU.

Sampling rows (temperature > 0) use the Gumbel-max trick: token = argmax(logits / T + G),
G ~ Gumbel(0, 1), drawn here from a torch.Generator seeded with seeds[b] (the Triton
kernel draws G from Philox with the same seed, so the two agree in distribution, not
sample for sample).
"""
from typing import Optional, Tuple

import torch

from .rmsnorm import rms_norm_ref


def router_mlp_ref(
    h: torch.Tensor,  # [B, H] normed hidden state
    w1: torch.Tensor,  # [R, H]
    b1: torch.Tensor,  # [R]
    w2: torch.Tensor,  # [R]
    b2: torch.Tensor,  # [] or [1]
) -> torch.Tensor:  # [B] float32 in (0, 1)
    z = torch.addmm(b1, h.float(), w1.t()).relu_()  # params are float32 (FoldedRouter.to)
    return torch.sigmoid(torch.mv(z, w2).add_(b2))


def gumbel_noise(seed: int, vocab: int) -> torch.Tensor:  # [V] float32
    g = torch.Generator().manual_seed(int(seed))
    u = torch.rand(vocab, generator=g, dtype=torch.float32).clamp_(min=1e-20)
    return -torch.log((-torch.log(u)).clamp_(min=1e-20))


def routed_head_ref(
    hidden: torch.Tensor,  # [B, H] last layer output (incl. residual), before the final norm
    norm_weight: torch.Tensor,  # [H]
    eps: float,
    lm_head: torch.Tensor,  # [V, H]
    router: Optional[Tuple[torch.Tensor, ...]],  # (w1 [R,H], b1 [R], w2 [R], b2 []) or None
    temperature: torch.Tensor,  # [B] float32, 0 = greedy
    seeds: torch.Tensor,  # [B] int64, per-row sampling seed for this step
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # token [B] int64, top_prob [B], score [B]
    h, _ = rms_norm_ref(hidden, norm_weight, eps)
    logits = torch.nn.functional.linear(h, lm_head).float()  # [B, V]
    top_prob = torch.softmax(logits, dim=-1).amax(dim=-1)
    tokens = logits.argmax(dim=-1)
    for b in torch.nonzero(temperature > 0).flatten().tolist():
        noisy = logits[b] / temperature[b] + gumbel_noise(int(seeds[b]), logits.shape[1])
        tokens[b] = noisy.argmax()
    if router is None:
        score = torch.full_like(top_prob, float("nan"))
    else:
        score = router_mlp_ref(h, *router)
    return tokens, top_prob, score
