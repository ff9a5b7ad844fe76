"""One decoder for the Llama / Qwen2 / Qwen3 families on a paged KV cache.

Activations are packed: [T, H] for all new tokens of all sequences in the batch.
q/k/v and gate/up projections are fused at load time (one GEMM each).
"""
from contextlib import nullcontext
from typing import Optional

import torch
from torch import nn
import torch.nn.functional as F

from citer.kernels.decoder_layer import CpuLayer, all_or_none
from citer.kernels.routed_head import router_mlp_cpu, router_scores_ref
from citer.kernels.sampling import choose_tokens, head_stats, sampling_probs

from .attention import AttentionMetadata, KVCache, paged_attention
from .config import ModelConfig
from .head import HeadOutput, HeadSpec
from .rope import RotaryEmbedding
from .router import RouterParams
from .tp import Shard, tp_head, vocab_parallel_embed


def linear(ops, mod: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """mod's y = x @ W.T + b through the ops (int8 weights when quantized: qweight, qscale)."""
    return ops.linear(x, *linear_weights(mod))


def linear_weights(mod: nn.Linear):
    """-> (weight [N, K] or int8 qweight, its qscale [N] or None, bias [N] or None). Reads the
    module's tensor dicts directly: nn.Module's attribute fallback (and the AttributeError a
    missing qweight raises through it) costs more than a CPU decode step's smaller ops, 121
    times a step at the small-Llama shape."""
    params, q = mod._parameters, mod._buffers.get("qweight")
    if q is not None:
        return q, mod._buffers["qscale"], params.get("bias")
    return params["weight"], None, params.get("bias")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, ops, x, residual=None):
        return ops.rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: Optional[Shard] = None):
        super().__init__()
        self.shard = shard
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias and (shard is None or shard.rank == 0))
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, ops, x, rope_cs, kv, meta: AttentionMetadata):
        t = x.shape[0]
        q, k, v = linear(ops, self.qkv_proj, x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(ops, q.reshape(-1, self.head_dim))[0].view_as(q)
            k = self.k_norm(ops, k.reshape(-1, self.head_dim))[0].view_as(k)
        q, k = ops.rotary(q, k, *rope_cs)
        o = paged_attention(ops, q, k, v.contiguous(), kv, meta, self.scale)
        out = linear(ops, self.o_proj, o.reshape(t, self.q_size))
        return self.shard.all_reduce(out) if self.shard is not None else out


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: Optional[Shard] = None):
        super().__init__()
        self.shard = shard
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size,
                                   bias=cfg.mlp_bias and (shard is None or shard.rank == 0))

    def forward(self, ops, x):
        gate, up = linear(ops, self.gate_up_proj, x).split(self.intermediate_size, dim=-1)
        out = linear(ops, self.down_proj, F.silu(gate) * up)
        return self.shard.all_reduce(out) if self.shard is not None else out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: Optional[Shard] = None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, shard)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, shard)

    def forward(self, ops, x, residual, rope_cs, kv, meta):
        h, residual = self.input_layernorm(ops, x, residual)
        if residual is None:  # first layer: the embedding is the residual stream
            residual = x
        h = self.self_attn(ops, h, rope_cs, kv, meta)
        h, residual = self.post_attention_layernorm(ops, h, residual)
        return self.mlp(ops, h), residual

    def cpu_layer(self) -> CpuLayer:
        """This layer as one call of the CPU extension (the same tensors; kernels/decoder_layer.py)."""
        a, m = self.self_attn, self.mlp
        return CpuLayer(self.input_layernorm.weight, self.post_attention_layernorm.weight, self.input_layernorm.eps,
                        a.q_norm.weight if a.q_norm is not None else None,
                        a.k_norm.weight if a.k_norm is not None else None,
                        [linear_weights(p) for p in (a.qkv_proj, a.o_proj, m.gate_up_proj, m.down_proj)],
                        a.num_heads, a.num_kv_heads, a.head_dim, m.intermediate_size, a.scale)


class DecoderLM(nn.Module):
    """Embeddings, decoder layers, final norm and lm_head.

    `forward` returns the last layer's output *before* the final norm (h + residual
    folded together), so the head (final norm + lm_head + router, fused on GPU) can run
    only on the rows that need a token. `head` is that head: tokens are chosen among the
    first `vocab_limit` ids (the vocabulary an SLM/LLM pair shares).

    With a Shard (tensor parallelism, tp.py) the model is one rank's slice: cfg is the
    rank's local config (its heads, KV heads, intermediate size), embeddings and lm_head
    hold its vocabulary rows, and forward and head run the collectives with the other ranks.
    """

    def __init__(self, cfg: ModelConfig, max_positions: int, vocab_limit: Optional[int] = None,
                 shard: Optional[Shard] = None):
        super().__init__()
        self.cfg, self.shard = cfg, shard
        self.vocab_limit = vocab_limit or cfg.vocab_size
        self.v0, v1 = shard.vocab(cfg.vocab_size) if shard is not None else (0, cfg.vocab_size)
        self.embed_tokens = nn.Embedding(v1 - self.v0, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, shard) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, v1 - self.v0, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(cfg, max_positions)
        self._cpu_layers: Optional[tuple] = None  # (a weight they hold, the layers as CpuLayer): see cpu_layers

    def forward(self, ops, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids, positions [T] -> pre-norm hidden states [T, H] (rows: only those rows)."""
        if self.shard is not None:
            x = vocab_parallel_embed(self.embed, input_ids, self.v0, self.embed_tokens.num_embeddings, self.shard)
        else:
            x = self.embed(input_ids)
        rope_cs = self.rotary(positions, x.dtype)
        residual: Optional[torch.Tensor] = None
        for layer, kv in zip(self.cpu_layers(ops, x, kv_cache, meta) or self.layers, kv_cache):
            x, residual = layer(ops, x, residual, rope_cs, kv, meta)
        if rows is not None:
            return x[rows] + residual[rows]
        return x + residual

    def cpu_layers(self, ops, x: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata) -> Optional[list]:
        """The layers as CpuLayer (one extension call each, the same outputs) when the ops run
        the CPU extension and this step fits its kernels (short queries: decode steps of any
        batch, short catch-ups); else None (the layers' own forward: prefills, TP ranks)."""
        if not ops.cpu_layers or self.shard is not None or not self.layers:
            return None
        key = linear_weights(self.layers[0].self_attn.qkv_proj)[0]  # replaced weights (quantized, reloaded): rebuild
        if self._cpu_layers is None or self._cpu_layers[0] is not key:
            self._cpu_layers = (key, all_or_none([layer.cpu_layer() for layer in self.layers]))
        layers = self._cpu_layers[1]
        return layers if layers[0].fits(x, kv_cache[0], meta) else None

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [T] (this rank's rows) -> embeddings [T, H] in the model's dtype; an int8
        table (a tied lm_head quantized: quantize.py) gives its rows dequantized."""
        q = self.embed_tokens._buffers.get("qweight")
        if q is None:
            return F.embedding(ids, self.embed_tokens.weight)
        return (q[ids].float() * self.embed_tokens._buffers["qscale"][ids, None]).to(self.norm.weight.dtype)

    def head(self, ops, hidden: torch.Tensor, spec: HeadSpec, phase=None) -> HeadOutput:
        """Pre-norm hidden [B, H] (one row per head position) -> each row's token, top
        probability and, with spec.router, router score. The fused op (ops.fused_head:
        one pass over the lm_head, no [B, vocab] logits) chooses every row's token; rows
        that filter (top-k / top-p / banned ids) or want their distribution or logprobs
        also get full logits, for those rows only, so a row's choice never depends on the
        rest of its batch. Without a fused op every row goes through full logits.
        phase: a profiler's phase(name) context factory; the unfused head's router is
        timed as "router" (the fused op has it inside its one pass)."""
        temperature, seeds = spec.tensors(hidden.device)
        if self.shard is not None:
            return self._tp_head(ops, hidden, spec, temperature, seeds)
        if not ops.fused_head:
            h = self.final_norm(ops, hidden)
            logits = self.logits_from_normed(ops, h)[:, :self.vocab_limit]
            stats = head_stats(logits)  # one pass for the token choice and a head-signal router's signals
            tokens, top_prob = choose_tokens(logits, temperature, seeds, spec.filters, stats)
            score = None
            if spec.router is not None:
                with phase("router") if phase is not None else nullcontext():
                    score = router_scores_ref(h, spec.router, top_prob, logits, stats)
            rows = torch.arange(len(hidden), device=hidden.device)
            probs, logprobs = self._extras(logits, rows, spec, temperature, len(hidden))
            return HeadOutput(tokens, top_prob, score, probs, logprobs)
        lm_head, lm_scale = self._lm_head_rows()
        tokens, top_prob, score = ops.routed_head(hidden, self.norm.weight, self.norm.eps, lm_head, spec.router,
                                                  temperature, seeds, lm_scale=lm_scale)
        need = [spec.needs_logits(i) for i in range(len(hidden))]
        probs = logprobs = None
        if any(need):
            rows = torch.tensor([i for i, w in enumerate(need) if w], device=hidden.device)
            logits = self.logits(ops, hidden[rows])[:, :self.vocab_limit]
            if spec.filters is not None:
                chosen, _ = choose_tokens(logits, temperature[rows], seeds[rows], _take(spec.filters, rows))
                tokens = tokens.index_copy(0, rows, chosen)
            probs, logprobs = self._extras(logits, rows, spec, temperature, len(hidden))
        return HeadOutput(tokens, top_prob, score if spec.router is not None else None, probs, logprobs)  # op: NaN

    def _lm_head_rows(self):
        """The lm_head's rows of the shared vocabulary -> (weights [V, H], scales [V] of int8 weights or None)."""
        q = self.lm_head._buffers.get("qweight")
        if q is None:
            return self.lm_head.weight[:self.vocab_limit], None
        return q[:self.vocab_limit], self.lm_head._buffers["qscale"][:self.vocab_limit]

    def _tp_head(self, ops, hidden: torch.Tensor, spec: HeadSpec, temperature, seeds) -> HeadOutput:
        """One rank's part of the head (tp.tp_head): its vocabulary slice's logits, the token
        and top probability agreed by all ranks, full logits only for the rows that need them."""
        if spec.router is not None:
            raise ValueError("a router scores the SLM's rows; a tensor-parallel model has none")
        logits = self.logits(ops, hidden)
        rows = torch.tensor([i for i in range(len(hidden)) if spec.needs_logits(i)], dtype=torch.long,
                            device=hidden.device)
        tokens, top_prob, full = tp_head(logits, self.v0, self.cfg.vocab_size, self.vocab_limit, temperature, seeds,
                                         self.shard, rows, _take(spec.filters, rows) if spec.filters else None)
        probs, logprobs = self._extras(full, rows, spec, temperature, len(hidden)) if len(rows) else (None, None)
        return HeadOutput(tokens, top_prob, None, probs, logprobs)

    @staticmethod
    def _extras(logits: torch.Tensor, rows: torch.Tensor, spec: HeadSpec, temperature: torch.Tensor, batch: int):
        """The sampling distributions / raw log-softmax of the rows that asked, as [B, V]
        tensors (other rows 0), from the full logits of `rows`."""
        probs = logprobs = None
        if spec.want_probs is not None:
            part = sampling_probs(logits, temperature[rows], _take(spec.filters, rows))
            probs = logits.new_zeros(batch, logits.shape[1]).index_copy_(0, rows, part)
        if spec.want_logprobs is not None:
            part = torch.log_softmax(logits.float(), dim=-1)
            logprobs = logits.new_zeros(batch, logits.shape[1]).index_copy_(0, rows, part)
        return probs, logprobs

    def router_score(self, ops, hidden: torch.Tensor, router: RouterParams) -> torch.Tensor:
        """Pre-norm hidden [B, H] -> a hidden-only router's score per row [B], without the
        lm_head (a head-signal router needs the head: see `head`)."""
        return router_mlp_cpu(hidden, router, norm=(self.norm.weight, self.norm.eps))

    def final_norm(self, ops, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(ops, hidden)[0]

    def logits(self, ops, hidden: torch.Tensor) -> torch.Tensor:
        """Pre-norm hidden [B, H] -> float32 logits [B, V]."""
        return self.logits_from_normed(ops, self.final_norm(ops, hidden))

    def logits_from_normed(self, ops, h: torch.Tensor) -> torch.Tensor:
        """Normed [B, H] -> float32 logits [B, V] (the ops' linear: few rows stream the
        lm_head once, at the memory bandwidth, on CPUs with the AVX-512 kernel)."""
        return linear(ops, self.lm_head, h).float()


def _take(filters, rows: torch.Tensor):
    return [filters[i] for i in rows.tolist()] if filters is not None else None
