"""Token choice from full logits: the torch reference of the routed head's choices.

Per row: greedy (argmax, lowest index on ties, as torch.argmax; also for temperatures
under MIN_TEMPERATURE, where logits / T would overflow), banned ids removed first (a
request under its min_tokens cannot end), temperature sampling by
the Gumbel-max trick (token = argmax(logits / T + G), G ~ Gumbel(0, 1) drawn from a
torch.Generator seeded with the row's seed for this step), and top-k / top-p filtering,
which needs the whole logits row (the fused Triton head has no filters). The top
probability is the softmax maximum of the raw logits (the "confidence" rule's signal).
`head_stats` gives each row's argmax and softmax statistics in one call of citer's CPU
kernel (csrc/cpu_head_stats.inc) where it applies: the greedy tokens and top probabilities
here, and the head signals (routed_head.head_signals_cpu).
"""
from typing import List, Optional, Tuple

import torch

from . import cpu_ext

MIN_TEMPERATURE = 1e-5  # a row whose temperature is under this is greedy (logits / T would overflow)
Filter = Tuple[int, float, Tuple[int, ...]]  # (top_k, top_p, banned token ids) of one row
NO_FILTER: Filter = (0, 1.0, ())


def gumbel_noise(seed: int, vocab: int) -> torch.Tensor:  # [V] float32, on the CPU whatever the device
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    u = torch.rand(vocab, generator=g, dtype=torch.float32, device="cpu").clamp_(min=1e-20)
    return -torch.log((-torch.log(u)).clamp_(min=1e-20))


def choose_tokens(
    logits: torch.Tensor,  # [B, V] float32
    temperature: torch.Tensor,  # [B] float32, 0 = greedy
    seeds: torch.Tensor,  # [B] int64, per-row sampling seed for this step
    filters: Optional[List[Filter]] = None,  # per row (top_k, top_p, banned ids); NO_FILTER = none
    stats: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,  # head_stats(logits), if the caller has it
) -> Tuple[torch.Tensor, torch.Tensor]:  # tokens [B] int64, top_prob [B] float32
    stats = stats if stats is not None else head_stats(logits)
    if stats is not None:  # top probability = 1 / sum_i exp(x_i - max) = 1 / (1 + rest)
        tokens, top_prob = stats[0], (stats[1][:, 2] + 1.0).reciprocal()
    else:
        tokens, top_prob = None, torch.softmax(logits, dim=-1).amax(dim=-1)
    if filters is not None:
        temps, seed_list = temperature.tolist(), seeds.tolist()
        tokens = [sample_row(logits[b], temps[b], *f, seed=seed_list[b]) for b, f in enumerate(filters)]
        return torch.tensor(tokens, dtype=torch.int64, device=logits.device), top_prob
    if tokens is None:
        tokens = logits.argmax(dim=-1)
    for b in torch.nonzero(temperature >= MIN_TEMPERATURE).flatten().tolist():
        noisy = logits[b] / temperature[b] + gumbel_noise(int(seeds[b]), logits.shape[1]).to(logits.device)
        tokens[b] = noisy.argmax()
    return tokens, top_prob


def head_stats(logits: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """logits [B, V] -> (argmax [B] int64, [B, 4] float32: top1, top2 (a repeated maximum
    counts twice), rest = sum of e_i over every index but the argmax, sum_i e_i z_i, with
    z_i = x_i - top1, e_i = exp(z_i)) from the CPU kernel, or None where it does not apply
    (then use torch)."""
    if (cpu_ext.AVAILABLE and logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2
            and logits.shape[0] > 0 and logits.shape[1] > 0 and logits.stride(1) == 1):
        tokens, stats = cpu_ext.ext.head_stats(logits)
        return tokens, stats
    return None


def sample_row(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, banned: Tuple[int, ...] = (),
               seed: int = 0) -> int:
    """logits [V] float32 -> one token id (never a banned one): greedy at temperatures
    under MIN_TEMPERATURE, else Gumbel-max over `filtered_logits`, i.e. a draw from
    `sampling_probs`."""
    if temperature < MIN_TEMPERATURE:
        return int(_ban(logits, banned).argmax())
    scaled = filtered_logits(logits, temperature, top_k, top_p, banned)
    noise = gumbel_noise(seed, scaled.numel()).to(scaled.device)
    return int((scaled + noise).argmax())


def _ban(logits: torch.Tensor, banned: Tuple[int, ...]) -> torch.Tensor:
    if not banned:
        return logits
    out = logits.clone()
    out[list(banned)] = float("-inf")
    return out


def filtered_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                    banned: Tuple[int, ...] = ()) -> torch.Tensor:
    """logits [V] -> logits / temperature with the banned ids removed, restricted (the rest
    -inf) to the top_k largest (0: all) and to the smallest set whose probability reaches
    top_p (the first token always stays)."""
    scaled = _ban(logits.float(), banned) / temperature
    if 0 < top_k < scaled.numel():
        kth = torch.topk(scaled, top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled


def sampling_probs(
    logits: torch.Tensor,  # [B, V] float32
    temperature: torch.Tensor,  # [B] float32
    filters: Optional[List[Filter]] = None,  # per row (top_k, top_p, banned ids)
) -> torch.Tensor:  # [B, V] float32: the distribution each row's token is drawn from
    """What choose_tokens draws each row's token from: one-hot at the argmax for greedy
    rows, softmax(filtered_logits) otherwise (the p and q of speculative sampling)."""
    temps = temperature.tolist()
    rows = []
    for b, t in enumerate(temps):
        top_k, top_p, banned = filters[b] if filters is not None else NO_FILTER
        if t < MIN_TEMPERATURE:
            rows.append(torch.nn.functional.one_hot(_ban(logits[b], banned).argmax(), logits.shape[1]).float())
        else:
            rows.append(torch.softmax(filtered_logits(logits[b], t, top_k, top_p, banned), dim=-1))
    return torch.stack(rows) if rows else logits.new_zeros(logits.shape)
