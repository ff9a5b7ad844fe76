"""ModelRunner: one model's step on the shared page table.

`run(seqs, spec)` is the step. For each sequence it forwards the positions this model
has not computed yet, [num_computed[name], len), runs the head on each sequence's last
position and returns one StepResult, aligned with seqs, with the spans it computed (the
core records them: the runner changes no sequence). The runner picks the path itself: a
CUDA graph (model body + fused head) when it has graphs and the batch fits a bucket,
else the eager forward (both pack the batch with batch.pack_batch), and, for the SLM
step, which rows get the head before and after their routing decisions.

The KV pool per layer is [num_blocks + 1, block_size, Hkv, D]: the extra last block is
the sink that padded graph lanes write to.
"""
from typing import Callable, List, Optional, Sequence as Seq, Tuple

import torch

from .batch import eager_inputs, pack_batch
from .config import EngineConfig
from .cuda_graph import CUDAGraph, GraphKey, StepGraphs, batch_buckets, query_len_buckets
from .head import StepResult
from .models.attention import AttentionMetadata
from .models.head import HeadOutput, HeadSpec
from .policies import RoutingStep


class ModelRunner:
    def __init__(self, name: str, model, ops, block_manager, config: EngineConfig, device: torch.device,
                 dtype: torch.dtype, timer, graph_pool=None, graphs: Optional[bool] = None):
        self.name = name  # "slm" | "llm": which of a sequence's computed counts is this model's
        self.model, self.cfg, self.ops, self.bm = model, model.cfg, ops, block_manager
        self.config, self.device, self.dtype, self.timer = config, device, dtype, timer
        self.block_size = config.block_size
        self.sink_block = config.num_blocks
        shape = (config.num_blocks + 1, config.block_size, self.cfg.num_kv_heads, self.cfg.head_dim)
        self.kv_cache = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(self.cfg.num_layers)
        ]
        self.graphs: Optional[StepGraphs] = None
        if config.cuda_graphs if graphs is None else graphs:  # graphs: this runner's own say (its device)
            self.build_graphs(CUDAGraph, graph_pool)

    @property
    def fused_head(self) -> bool:
        """One head pass gives every row its token, top probability and router score (the
        ops' fused head, or a graph, which holds the whole head): the step never splits it."""
        return self.ops.fused_head or self.graphs is not None

    def build_graphs(self, graph_cls=CUDAGraph, pool=None) -> None:
        """CUDA graphs of this model's step: decode buckets (B, 1) for the SLM, catch-up
        buckets (B, L <= max_graph_query_len) for the LLM. graph_cls=EagerGraph replays
        the same buffers eagerly (the CPU tests)."""
        cfg = self.config
        query_lens = [1] if self.name == "slm" else query_len_buckets(min(cfg.max_graph_query_len, cfg.max_model_len))
        extra = [2] if self.name == "slm" else []  # the SLM's catch-up after every speculative draft stood
        self.graphs = StepGraphs(batch_buckets(cfg.max_num_seqs), query_lens, -(-cfg.max_model_len // self.block_size),
                                 self.sink_block, self.block_size, self.device, graph_cls, pool, extra)

    # ---- the step -----------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, seqs: Seq, spec: HeadSpec, head_tokens: Optional[List[int]] = None,
            route: Optional[RoutingStep] = None, ends: Optional[List[int]] = None) -> StepResult:
        """Forward what this model has not computed of each sequence, then the head on each
        sequence's last position (its last head_tokens[i] positions, for verification;
        spec has one row per head position). route (the SLM step): the rows' policies,
        asked once per row; the decisions come back in result.to_llm. The runner alone
        decides which rows get the head: every row in one pass where the head is fused;
        on an unfused head, when no row needs more of it, an early exit: the rows whose
        decision reads the head first, the decisions (hidden-only routers score every row
        from the hidden state), then the lm_head only for the rows the SLM keeps. ends:
        forward positions only up to these (a prefill of the prompt; default: every token)."""
        if head_tokens is not None and all(n == 1 for n in head_tokens):
            head_tokens = None
        starts, ends = [s.num_computed[self.name] for s in seqs], ends or [len(s) for s in seqs]
        short = [s.request_id for s, a, b, n in zip(seqs, starts, ends, head_tokens or [1] * len(seqs)) if b - a < n]
        if short:  # the head would read another row: a position was computed ahead of its step
            raise RuntimeError(f"{self.name}: the head needs positions this step does not compute "
                               f"(requests {short[:3]}); a position was computed ahead of the step that needs it")
        split = (route is not None and not self.fused_head and spec.want_probs is None
                 and not (spec.router is not None and spec.router.head_signals))
        with self.timer.phase(self.name):
            graphed = self._replay(seqs, starts, ends, spec, head_tokens) if self.graphs is not None else None
            hidden = graphed[0] if graphed is not None else self.forward(seqs, starts, ends, head_tokens)
            if graphed is not None and spec.filters is None and spec.want_probs is None \
                    and spec.want_logprobs is None and (head_tokens is None or not any(spec.temperature)):
                result = _result(graphed[1], head_tokens)
            elif not split:
                result = _result(self.model.head(self.ops, hidden, spec, self.timer.phase), head_tokens)
        if split:
            result = self._early_exit(hidden, spec, route)
        elif route is not None:
            result.to_llm = route.decide(result.top_prob, result.router_score)
        result.spans = list(zip(starts, ends))
        return result

    def _early_exit(self, hidden: torch.Tensor, spec: HeadSpec, route: RoutingStep) -> StepResult:
        """An unfused head, one row per sequence: the router from the hidden state, the
        lm_head of the rows whose decision reads it, the decisions, the other kept rows' lm_head."""
        result = StepResult.empty(len(hidden))
        if spec.router is not None:
            with self.timer.phase("router"):
                result.router_score = self.model.router_score(self.ops, hidden, spec.router).tolist()
        first = [i for i, f in enumerate(route.head_first) if f]
        if first:
            self._head_rows(result, hidden, spec, first)
        result.to_llm = route.decide(result.top_prob, result.router_score)
        rest = [i for i, f in enumerate(route.head_first) if not f and not result.to_llm[i]]
        if rest:
            self._head_rows(result, hidden, spec, rest)
        return result

    def _head_rows(self, result: StepResult, hidden: torch.Tensor, spec: HeadSpec, rows: List[int]) -> None:
        with self.timer.phase(self.name):
            out = self.model.head(self.ops, hidden[rows], spec.rows(rows).without_router())
            tokens, top_prob, _ = out.to_host()
        result.fill(rows, tokens, top_prob, out.logprobs)

    def forward(self, seqs: Seq, starts: List[int], ends: List[int],
                head_tokens: Optional[List[int]] = None) -> torch.Tensor:
        """Eager: positions [start, end) of each sequence -> pre-norm hidden [rows, H] of each
        sequence's last position (its last head_tokens[i] positions, in order)."""
        ids, pos, meta = eager_inputs(self.bm, self.sink_block, self.block_size, seqs, starts, ends, self.device)
        rows = _head_row_index(meta.query_start_loc.tolist(), head_tokens, self.device)
        return self.model(self.ops, ids, pos, self.kv_cache, meta, rows)

    # ---- CUDA graphs ----------------------------------------------------------------------
    def _replay(self, seqs: Seq, starts: List[int], ends: List[int], spec: HeadSpec,
                head_tokens: Optional[List[int]]) -> Optional[Tuple[torch.Tensor, HeadOutput]]:
        """The step through the graph of its bucket -> (hidden [b, H], head of b rows),
        views of graph memory valid until the next replay or capture of either model
        (they share a pool); None when no bucket fits."""
        g = self.graphs
        bucket = g.bucket([e - s for s, e in zip(starts, ends)])
        if bucket is None:
            return None
        if spec.router is not None:
            g.use_router(spec.router)
        key = (*bucket, spec.router is not None) + ((True,) if head_tokens is not None else ())
        graph = g.get(key, self._graph_step)
        g.inputs.writable()
        t, _ = pack_batch(self.bm, self.sink_block, seqs, starts, ends, g.host_batch())
        temperature, seeds = (spec.temperature, spec.seeds) if head_tokens is None else ([0.0] * len(seqs), [0] * len(seqs))
        g.stage(bucket, len(seqs), t, temperature, seeds)
        hidden, head = graph.replay()
        if head_tokens is None:
            return hidden[:len(seqs)], head.first(len(seqs))
        idx = _head_row_index(g.host.query_start_loc[:len(seqs) + 1].tolist(), head_tokens, hidden.device)
        return hidden[idx], head.select(idx)

    def _graph_step(self, key: GraphKey) -> Callable[[], Tuple[torch.Tensor, HeadOutput]]:
        """The function a graph of this bucket captures: body + fused head on the static
        buffers; the head on each lane's last token, or with key (B, L, router, True) on
        every token row (a verifying catch-up; greedy: temperatures and seeds are zero)."""
        num_b, num_l, with_router = key[:3]
        all_rows = len(key) == 4
        v, cfg = self.graphs.views((num_b, num_l)), self.cfg
        # padding and tail lanes must not change how the attention op splits the keys: the
        # split count of the real-lane bucket, as an eager step of num_b sequences gets
        splits = self.ops.attention_splits(num_b, num_l, cfg.num_heads, cfg.num_kv_heads, self.device)
        meta = AttentionMetadata(slot_mapping=v.slot_mapping, block_tables=v.block_tables, seq_lens=v.seq_lens,
                                 query_start_loc=v.query_start_loc, max_query_len=num_l, max_seq_len=v.max_seq_len,
                                 num_splits=splits)
        spec = HeadSpec(v.temperature, v.seeds, router=self.graphs.router if with_router else None)
        model, ops, kv_cache = self.model, self.ops, self.kv_cache

        if all_rows:
            num_t = num_b * num_l
            zeros = torch.zeros(num_t, dtype=torch.int64, device=self.device)
            spec = HeadSpec(zeros.float(), zeros, router=spec.router)

        def step() -> Tuple[torch.Tensor, HeadOutput]:
            hidden = model(ops, v.input_ids, v.positions, kv_cache, meta)
            hidden = hidden if all_rows else hidden[v.last_idx]
            return hidden, model.head(ops, hidden, spec)

        return step

    def capture_graphs(self, router=None, speculative: bool = False) -> int:
        """Capture every bucket not yet captured (with this router too, when given),
        largest first; -> how many. speculative: also the buckets only speculative
        decoding and check-and-correct use (the SLM's 2-token catch-up, the LLM's
        verifying all-row variants)."""
        if self.graphs is None:
            return 0
        n = 0
        for with_router in (False, True) if router is not None else (False,):
            if with_router:
                self.graphs.use_router(router)
            keys = self.graphs.keys(with_router, extra=speculative)
            if self.name == "slm":
                keys = [k for k in keys if len(k) == 3]  # the SLM's head is never all-row
            todo = [k for k in keys if k not in self.graphs.graphs]
            for key in todo:
                self.graphs.get(key, self._graph_step)
            n += len(todo)
        return n


def _head_row_index(query_start_loc: List[int], head_tokens: Optional[List[int]], device) -> torch.Tensor:
    """Rows of a packed forward that get the head: each sequence's last head_tokens[i]
    rows (its last row when head_tokens is None)."""
    ends = query_start_loc[1:]
    if head_tokens is None:
        idx = [e - 1 for e in ends]
    else:
        idx = [r for e, n in zip(ends, head_tokens) for r in range(e - n, e)]
    return torch.tensor(idx, dtype=torch.long, device=device)


def _result(head: HeadOutput, head_tokens: Optional[List[int]]) -> StepResult:
    """The head's rows -> a StepResult per sequence (per-position lists with head_tokens)."""
    tokens, top_prob, score = head.to_host()
    if head_tokens is None:
        split = lambda t: list(t.split(1)) if t is not None else None  # noqa: E731
        return StepResult(tokens, top_prob, score, probs=split(head.probs), logprobs=split(head.logprobs))
    out = StepResult([], [], [] if score is not None else None, position_tokens=[],
                     probs=[] if head.probs is not None else None,
                     logprobs=[] if head.logprobs is not None else None)
    o = 0
    for n in head_tokens:
        out.position_tokens.append(tokens[o:o + n])
        out.tokens.append(tokens[o + n - 1])
        out.top_prob.append(top_prob[o + n - 1])
        if score is not None:
            out.router_score.append(score[o + n - 1])
        if head.probs is not None:
            out.probs.append(head.probs[o:o + n])
        if head.logprobs is not None:
            out.logprobs.append(head.logprobs[o:o + n])
        o += n
    return out
