"""Teacher forcing with citer's own models, in the dtype the engine runs them.

A router is trained on the features the engine feeds it at inference: the SLM's final
normed hidden state and the head's signals of its logits, from the same model code,
dtype and ops as the engine's torch path (citer.engine.models, TORCH_OPS). `Forcer.run`
forwards whole sequences (packed, no padding, sorted by length into chunks of at most
max_chunk_tokens so that big matmuls use the CPU's bfloat16 units) and returns, per
sequence, the rows of the positions asked for: the SLM's hidden state, signals, greedy
token and log-probability of the next token, and the LLM's greedy token and log-
probability of the next token (over the first vocab_limit ids, the vocabulary the pair
shares, as the engine chooses tokens). The vocabulary-sized logits are computed a few
hundred rows at a time and never kept.
"""
import functools
import hashlib
from dataclasses import dataclass
from typing import List, Optional

import torch
from tqdm import tqdm

from citer.engine.models import load_model
from citer.engine.models.attention import AttentionMetadata
from citer.kernels.ops import TORCH_OPS
from citer.kernels.routed_head import head_signals_ref

HEAD_ROWS = 256  # logits rows at a time: 256 x 152K float32 is 155 MB


@dataclass
class Forced:
    """Both models teacher-forced over one sequence; row r is position offset + r, which
    predicts token offset + r + 1."""

    hidden: torch.Tensor  # [R, H] float32: the SLM's normed final hidden state
    signals: torch.Tensor  # [R, NUM_SIGNALS] the head's signals of the SLM's logits
    slm_pred: torch.Tensor  # [R] the SLM's greedy token
    llm_pred: torch.Tensor  # [R] the LLM's greedy token
    slm_logp_next: torch.Tensor  # [R] the SLM's log-probability of the next token (last position: 0)
    llm_logp_next: torch.Tensor  # [R] the LLM's
    offset: int = 0


class Forcer:
    def __init__(self, slm_path: str, llm_path: Optional[str], dtype: str = "float32",
                 vocab_limit: Optional[int] = None, max_chunk_tokens: int = 4096, max_positions: int = 4096,
                 block_size: int = 16, progress: bool = False):
        self.slm, slm_cfg = load_model(slm_path, "cpu", dtype, max_positions=max_positions)
        self.llm, llm_cfg = load_model(llm_path, "cpu", dtype, max_positions=max_positions) if llm_path else (None,
                                                                                                         None)
        self.vocab_limit = vocab_limit or min(c.vocab_size for c in (slm_cfg, llm_cfg) if c is not None)
        self.max_chunk_tokens, self.block_size, self.progress = max_chunk_tokens, block_size, progress
        self.dtype = self.slm.norm.weight.dtype  # (an int8 tied embedding has no float weight)

    @classmethod
    def from_engine(cls, engine, max_chunk_tokens: int = 4096, progress: bool = False) -> "Forcer":
        """A Forcer over an Engine's own models (no second copy of the weights); sequences must
        fit the engine's max_model_len."""
        if engine.args.llm_tensor_parallel_size > 1:  # its forward would run on rank 0 alone
            raise ValueError("teacher forcing (router training, the token-match oracle) needs an LLM on one "
                             f"device; this engine splits it over {engine.args.llm_tensor_parallel_size} ranks: "
                             "build one with llm_tensor_parallel_size=1")
        f = cls.__new__(cls)
        f.slm, f.llm = engine.core.slm.model, engine.core.llm.model if engine.core.llm is not None else None
        f.vocab_limit = engine.core.vocab_limit
        f.max_chunk_tokens, f.block_size, f.progress = max_chunk_tokens, 16, progress
        f.dtype = f.slm.norm.weight.dtype
        return f

    @functools.cached_property
    def fingerprint(self) -> str:
        """What its forwards depend on, for cache keys: the dtype, the vocabulary limit and the
        first values of every tensor of both models (another pair, or retrained weights, differ)."""
        h = hashlib.sha1(f"{self.dtype} {self.vocab_limit}".encode())
        for model in (self.slm, self.llm):
            for name, t in (model.state_dict().items() if model is not None else ()):
                h.update(name.encode())
                h.update(t.detach().flatten()[:64].float().cpu().numpy().tobytes())
            h.update(b"|")
        return h.hexdigest()[:16]

    @torch.inference_mode()
    def run(self, seqs: List[List[int]], starts: Optional[List[int]] = None, slm: bool = True) -> List[Forced]:
        """-> per sequence a Forced over positions [starts[i] - 1, len) (default: all).
        slm=False: the LLM's forward only (hidden, signals and the SLM's fields are empty)."""
        offsets = [max(s - 1, 0) for s in starts] if starts is not None else [0] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        out: List[Optional[Forced]] = [None] * len(seqs)
        chunks, cur, tokens = [], [], 0
        for i in order:
            if cur and tokens + len(seqs[i]) > self.max_chunk_tokens:
                chunks.append(cur)
                cur, tokens = [], 0
            cur.append(i)
            tokens += len(seqs[i])
        if cur:
            chunks.append(cur)
        for chunk in tqdm(chunks, desc="teacher forcing", unit="chunk", disable=not self.progress):
            for i, f in zip(chunk, self._chunk([seqs[i] for i in chunk], [offsets[i] for i in chunk], slm)):
                out[i] = f
        return out

    def _chunk(self, seqs: List[List[int]], offsets: List[int], with_slm: bool = True) -> List[Forced]:
        ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
        pos = torch.cat([torch.arange(len(s)) for s in seqs])
        rows = torch.cat([torch.arange(o, len(s)) + start for s, o, start in
                          zip(seqs, offsets, _starts(seqs))])  # packed rows that get the head
        nxt = torch.cat([torch.tensor(s[o + 1:] + [0]) for s, o in zip(seqs, offsets)])
        if with_slm:
            h = self.slm.final_norm(TORCH_OPS, self._forward(self.slm, ids, pos, seqs)[rows])
            slm_pred, slm_logp, signals = self._head(self.slm, h, nxt, want_signals=True)
        else:
            h, slm_pred = torch.zeros(len(rows), 0), torch.full((len(rows),), -1, dtype=torch.long)
            slm_logp, signals = torch.zeros(len(rows)), torch.zeros(len(rows), 0)
        if self.llm is not None:
            llm_h = self.llm.final_norm(TORCH_OPS, self._forward(self.llm, ids, pos, seqs)[rows])
            llm_pred, llm_logp, _ = self._head(self.llm, llm_h, nxt, want_signals=False)
        else:
            llm_pred, llm_logp = torch.full_like(slm_pred, -1), torch.zeros_like(slm_logp)
        out, r = [], 0
        for s, o in zip(seqs, offsets):
            n = len(s) - o
            last = torch.zeros(n, dtype=torch.bool)
            last[-1] = True  # the last position has no next token
            out.append(Forced(h[r:r + n].float(), signals[r:r + n], slm_pred[r:r + n], llm_pred[r:r + n],
                              slm_logp[r:r + n].masked_fill(last, 0.0), llm_logp[r:r + n].masked_fill(last, 0.0),
                              o))
            r += n
        return out

    def _forward(self, model, ids: torch.Tensor, pos: torch.Tensor, seqs: List[List[int]]) -> torch.Tensor:
        """A packed prefill of these sequences on a KV cache of their own -> pre-norm hidden [T, H]."""
        bs, cfg = self.block_size, model.cfg
        nblocks = [-(-len(s) // bs) for s in seqs]
        total = sum(nblocks)
        tables = torch.full((len(seqs), max(nblocks)), total, dtype=torch.int32)  # padding: a spare block
        first = 0
        for i, n in enumerate(nblocks):
            tables[i, :n] = torch.arange(first, first + n, dtype=torch.int32)
            first += n
        block_of = torch.cat([tables[i, torch.arange(len(s)) // bs].long() for i, s in enumerate(seqs)])
        slots = block_of * bs + pos % bs
        shape = (total + 1, bs, cfg.num_kv_heads, cfg.head_dim)
        # zeros, not empty: attention reads padded positions it masks out, and 0 * NaN is NaN
        kv = [(torch.zeros(shape, dtype=self.dtype), torch.zeros(shape, dtype=self.dtype))
              for _ in range(cfg.num_layers)]
        lens = torch.tensor([len(s) for s in seqs], dtype=torch.int32)
        meta = AttentionMetadata(slot_mapping=slots, block_tables=tables, seq_lens=lens,
                                 query_start_loc=torch.cat([torch.zeros(1, dtype=torch.int32),
                                                            lens.cumsum(0).to(torch.int32)]),
                                 max_query_len=int(lens.max()), max_seq_len=int(lens.max()))
        return model(TORCH_OPS, ids, pos, kv, meta)

    def _head(self, model, h: torch.Tensor, nxt: torch.Tensor, want_signals: bool):
        """Normed rows [R, H] -> greedy token [R], log-probability of nxt [R], signals [R, S]."""
        preds, logps, sigs = [], [], []
        for a in range(0, len(h), HEAD_ROWS):
            logits = model.logits_from_normed(TORCH_OPS, h[a:a + HEAD_ROWS])[:, :self.vocab_limit]
            preds.append(logits.argmax(-1))
            lse = torch.logsumexp(logits, -1)
            idx = nxt[a:a + HEAD_ROWS].clamp(max=self.vocab_limit - 1)
            logps.append(logits.gather(-1, idx[:, None])[:, 0] - lse)
            if want_signals:
                sigs.append(head_signals_ref(logits))
        return torch.cat(preds), torch.cat(logps), torch.cat(sigs) if want_signals else None


def _starts(seqs: List[List[int]]) -> List[int]:
    out, o = [], 0
    for s in seqs:
        out.append(o)
        o += len(s)
    return out
