"""Tensor parallelism for the decoder (Megatron-style), over torch.distributed.

A Shard says which slice of the model a rank holds and how ranks combine:
  - attention: q/k/v column-parallel (each rank its heads), o_proj row-parallel, one
    all-reduce after it; KV heads split across ranks, or, with fewer KV heads than
    ranks, each replicated on world / num_kv_heads ranks (as vLLM does);
  - MLP: gate/up column-parallel (each rank its slice of the intermediate size),
    down_proj row-parallel, one all-reduce after it; row-parallel biases on rank 0 only;
  - embeddings and lm_head vocab-parallel: each rank the rows [v0, v1) of ceil(V / world);
    an embedding lookup is masked to the rank's rows and all-reduced;
  - the head (`tp_head`): each rank's logits over its vocabulary slice give a local
    argmax (or Gumbel-max: the noise of token id t depends only on the row's seed and t,
    so each rank draws exactly its slice of what one device would draw), a local max and
    sum of exp; one all-gather of [B, 4] numbers gives every rank the token and the top
    probability. No [rows, vocab] logits are gathered, except for the rows that need
    them (top-k / top-p / banned ids, distributions, logprobs).
`local_config` is the rank's ModelConfig (its heads, KV heads, intermediate size; the
vocabulary stays global), `shard_slices` what each HF tensor's slice is, so that a rank
reads only its slices from the safetensors files.
"""
from dataclasses import dataclass, replace
from typing import Any, Optional, Tuple

import torch

from citer.kernels.sampling import MIN_TEMPERATURE, choose_tokens, gumbel_noise

from .config import ModelConfig


@dataclass(frozen=True)
class Shard:
    rank: int
    world: int
    group: Any = None  # a torch.distributed process group (None: the default group)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """[...] per rank -> [world, ...] (every rank the same)."""
        import torch.distributed as dist

        out = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(out, x.contiguous(), group=self.group)
        return torch.stack(out)

    def heads(self, cfg: ModelConfig) -> Tuple[int, int]:
        """-> (first q head, q heads) of this rank."""
        n = cfg.num_heads // self.world
        return self.rank * n, n

    def kv_heads(self, cfg: ModelConfig) -> Tuple[int, int]:
        """-> (first KV head, KV heads) of this rank (one replicated head with fewer KV heads than ranks)."""
        if cfg.num_kv_heads % self.world == 0:
            n = cfg.num_kv_heads // self.world
            return self.rank * n, n
        return self.rank * cfg.num_kv_heads // self.world, 1

    def vocab(self, vocab_size: int) -> Tuple[int, int]:
        per = -(-vocab_size // self.world)
        v0 = min(self.rank * per, vocab_size)
        return v0, min(vocab_size, v0 + per)


def check_shardable(cfg: ModelConfig, world: int) -> None:
    """Raise, naming the number, unless this model splits over `world` ranks."""
    problems = []
    if cfg.num_heads % world:
        problems.append(f"{cfg.num_heads} attention heads")
    if cfg.num_kv_heads % world and world % cfg.num_kv_heads:
        problems.append(f"{cfg.num_kv_heads} KV heads (neither a multiple nor a divisor of {world})")
    if cfg.intermediate_size % world:
        problems.append(f"intermediate size {cfg.intermediate_size}")
    if problems:
        raise ValueError(f"cannot split the model over {world} tensor-parallel ranks: {', '.join(problems)} "
                         f"do not divide by {world}")


def local_config(cfg: ModelConfig, shard: Shard) -> ModelConfig:
    return replace(cfg, num_heads=cfg.num_heads // shard.world, num_kv_heads=shard.kv_heads(cfg)[1],
                   intermediate_size=cfg.intermediate_size // shard.world)


def shard_slices(hf_name: str, cfg: ModelConfig, shard: Shard) -> Optional[Tuple[int, int, int]]:
    """The slice of an HF tensor this rank holds -> (dim, start, stop), None for all of it,
    or (-1, 0, 0) for none of it (a row-parallel bias, on rank 0 only)."""
    hd = cfg.head_dim
    q0, nq = shard.heads(cfg)
    k0, nk = shard.kv_heads(cfg)
    inter = cfg.intermediate_size // shard.world
    name = hf_name.split(".")
    kind = ".".join(name[-3:-1]) if len(name) >= 3 else ""
    last = name[-1]
    if hf_name.endswith(("embed_tokens.weight", "lm_head.weight")):
        return (0, *shard.vocab(cfg.vocab_size))
    if kind == "self_attn.q_proj":
        return 0, q0 * hd, (q0 + nq) * hd
    if kind in ("self_attn.k_proj", "self_attn.v_proj"):
        return 0, k0 * hd, (k0 + nk) * hd
    if kind in ("mlp.gate_proj", "mlp.up_proj"):
        return 0, shard.rank * inter, (shard.rank + 1) * inter
    if kind == "self_attn.o_proj":
        return (1, q0 * hd, (q0 + nq) * hd) if last == "weight" else (None if shard.rank == 0 else (-1, 0, 0))
    if kind == "mlp.down_proj":
        return (1, shard.rank * inter, (shard.rank + 1) * inter) if last == "weight" else \
            (None if shard.rank == 0 else (-1, 0, 0))
    return None


def vocab_parallel_embed(embed, ids: torch.Tensor, v0: int, rows: int, shard: Shard) -> torch.Tensor:
    """embed(local ids) -> [T, H] over this rank's `rows` vocabulary rows from v0; ids
    outside them count 0, and the ranks' sum is every token's embedding."""
    local = ids - v0
    inside = (local >= 0) & (local < rows)
    x = embed(torch.where(inside, local, torch.zeros_like(local)))
    return shard.all_reduce(x * inside[:, None].to(x.dtype))


def tp_head(logits: torch.Tensor, v0: int, vocab_size: int, vocab_limit: int, temperature: torch.Tensor,
            seeds: torch.Tensor, shard: Shard, full_rows=None, filters=None):
    """A rank's logits [B, Vs] over vocabulary ids [v0, v0 + Vs) -> (tokens [B] int64,
    top_prob [B] float32, full logits of full_rows [len, vocab_limit] or None), the same on
    every rank; every rank calls it with the same arguments but its own logits."""
    b, vs = logits.shape
    ids = torch.arange(v0, v0 + vs, device=logits.device)
    logits = logits.masked_fill(ids[None, :] >= vocab_limit, float("-inf"))
    score = logits.clone()
    for r in torch.nonzero(temperature >= MIN_TEMPERATURE).flatten().tolist():
        noise = gumbel_noise(int(seeds[r]), vocab_limit).to(logits.device)
        lo, hi = min(v0, vocab_limit), min(v0 + vs, vocab_limit)
        part = torch.full((vs,), float("-inf"), device=logits.device)
        part[:hi - lo] = logits[r, :hi - lo] / temperature[r] + noise[lo:hi]
        score[r] = part
    best, idx = score.max(-1)
    m = logits.max(-1).values
    s = torch.exp(logits - m[:, None].clamp_min(-1e30)).sum(-1)
    stats = shard.all_gather(torch.stack([best, (idx + v0).to(best.dtype), m, s], -1).float())  # [W, B, 4]
    win = stats[:, :, 0].argmax(0)  # the first rank with the highest score: the lowest id on ties
    tokens = stats[win, torch.arange(b), 1].long()
    gm = stats[:, :, 2].max(0).values
    top_prob = 1.0 / (stats[:, :, 3] * torch.exp(stats[:, :, 2] - gm)).sum(0)
    full = None
    if full_rows is not None and len(full_rows):
        parts = shard.all_gather(_padded(logits[full_rows], -(-vocab_size // shard.world)))  # [W, R, per]
        full = parts.permute(1, 0, 2).reshape(len(full_rows), -1)[:, :vocab_limit]
        if filters is not None:
            chosen, _ = choose_tokens(full, temperature[full_rows], seeds[full_rows], filters)
            tokens = tokens.index_copy(0, full_rows, chosen)
    return tokens, top_prob.float(), full


def _padded(x: torch.Tensor, width: int) -> torch.Tensor:
    if x.shape[1] >= width:
        return x[:, :width]
    return torch.cat([x, x.new_full((x.shape[0], width - x.shape[1]), float("-inf"))], 1)
