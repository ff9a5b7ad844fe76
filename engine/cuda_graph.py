"""CUDA graphs for the steady-state steps: model body + routed head, replayed per bucket.

A step of `b` sequences with at most `l` new tokens each runs in the graph of the
smallest bucket (B >= b, L >= l): the SLM decode step uses buckets (B, 1), the LLM
catch-up step (B, L) for L up to `max_query_len` and B x L up to MAX_GRAPH_TOKENS.
Prompt prefills and longer or larger catch-ups run eagerly. A graph replays the kernels
it captured on fixed (static) buffers, so each step only copies its inputs into them
(one host-to-device copy). A graph has B*L token rows and B lanes, plus B tail lanes
when L > 1; every row belongs to a lane:

  lanes [0, b)   the real sequences, their t new tokens packed as in an eager step
  lanes [b, B)   padding: one token each at position 0 (its head output is dropped)
  lanes [B, 2B)  tail: the B*L - t - (B - b) rows left, up to L per lane, positions 0..

Padding and tail lanes have block tables that point at the sink block only, so their
KV writes land there and their attention reads only it; the kernels take lengths from
seq_lens / query_start_loc and L only as an upper bound, so one graph serves every
batch that fits its bucket. Rows never mix outside attention, and attention is per
lane, so padding cannot reach a real row; the Triton attention splits the keys by the
real-lane bucket B, as an eager step of B sequences would. Graphs are captured at a
bucket's first use (or all at once by Engine.capture_cuda_graphs), after two eager
warm-up runs on padding-only buffers (Triton compiles and cuBLAS picks its kernels then,
never during capture), and share one memory pool.

`graph_cls` is what captures: CUDAGraph on a GPU; EagerGraph re-runs the captured
function on the static buffers, which lets the CPU tests check the padding and buffer
logic under the Triton interpreter (the GPU tests check real capture and replay).
"""
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Sequence as Seq, Tuple

import numpy as np
import torch

from citer.kernels.paged_attention import SPLIT_KV_MAX_Q, split_kv_num_splits
from citer.models.attention import AttentionMetadata

MAX_GRAPH_TOKENS = 2048  # buckets with more token rows (B x L) run eagerly: big graphs, rare steps

# pre-norm hidden [B, H]; head [3, B] float64: token ids, top probability, router score
# (one tensor, so the step's results reach the host in one copy)
StepOut = Tuple[torch.Tensor, torch.Tensor]


def batch_buckets(max_num_seqs: int) -> List[int]:
    """1, 2, 4, 8, then every multiple of 8, up to and including max_num_seqs."""
    sizes = [b for b in (1, 2, 4) if b < max_num_seqs] + list(range(8, max_num_seqs, 8))
    return sizes + [max_num_seqs]


def query_len_buckets(max_query_len: int) -> List[int]:
    """Powers of two below max_query_len, and max_query_len."""
    sizes, q = [], 1
    while q < max_query_len:
        sizes.append(q)
        q *= 2
    return sizes + [max_query_len]


def pick_bucket(buckets: Seq[int], n: int) -> Optional[int]:
    """Smallest bucket >= n, or None when n exceeds them all."""
    for b in buckets:
        if b >= n:
            return b
    return None


def attach_graphs(slm, llm, config, vocab_limit: int, graph_cls=None) -> None:
    """Give each model runner its GraphedStep: the SLM decode buckets (B, 1), the LLM
    catch-up buckets (B, L <= config.max_graph_query_len)."""
    graph_cls = graph_cls or CUDAGraph
    pool = torch.cuda.graph_pool_handle() if graph_cls is CUDAGraph else None  # one pool for all graphs
    sizes = batch_buckets(config.max_num_seqs)
    max_query_len = min(config.max_graph_query_len, config.max_model_len)
    for runner, query_lens in ((slm, [1]), (llm, query_len_buckets(max_query_len))):
        if runner is not None:
            runner.graphs = GraphedStep(runner, vocab_limit, config.max_model_len, sizes, query_lens, graph_cls, pool)


class CUDAGraph:
    """fn captured once into a torch.cuda.CUDAGraph; replay() re-launches its kernels."""

    warmup_runs = 2

    def __init__(self, fn: Callable[[], StepOut], pool):
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = fn()

    def replay(self) -> StepOut:
        self.graph.replay()
        return self.out


class EagerGraph:
    """Stand-in with CUDAGraph's interface that calls fn again at every replay (CPU tests)."""

    warmup_runs = 0  # nothing compiles or is recorded

    def __init__(self, fn: Callable[[], StepOut], pool):
        self.fn = fn

    def replay(self) -> StepOut:
        return self.fn()


class StaticInputs:
    """Named input tensors carved out of one byte buffer on the host (pinned on CUDA) and
    its twin on the device, so a step's inputs reach the device in one copy. Fields are
    8-byte aligned, in the order given; `host.<name>` / `dev.<name>` are the views."""

    def __init__(self, fields, device: torch.device):
        offsets, sizes, total = {}, {}, 0
        for name, shape, dtype, _ in fields:
            offsets[name] = total
            sizes[name] = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
            total += -(-sizes[name] // 8) * 8
        self.nbytes = total
        self.offsets = offsets
        self.host_buf = torch.zeros(total, dtype=torch.uint8, pin_memory=device.type == "cuda")
        self.dev_buf = torch.zeros(total, dtype=torch.uint8, device=device)
        self.copied = torch.cuda.Event() if device.type == "cuda" else None  # the last copy's completion
        self.host, self.dev = SimpleNamespace(), SimpleNamespace()
        for name, shape, dtype, fill in fields:
            for ns, buf in ((self.host, self.host_buf), (self.dev, self.dev_buf)):
                setattr(ns, name, buf[offsets[name]:offsets[name] + sizes[name]].view(dtype).view(shape))
            getattr(self.host, name).fill_(fill)
        self.copy(total)

    def copy(self, nbytes: int) -> None:
        """Device <- host, the first nbytes (asynchronous from pinned memory)."""
        self.dev_buf[:nbytes].copy_(self.host_buf[:nbytes], non_blocking=True)
        if self.copied is not None:
            self.copied.record()

    def writable(self) -> None:
        """Wait until the last copy has read the host buffer (call before writing it)."""
        if self.copied is not None:
            self.copied.synchronize()


class GraphedStep:
    """Static inputs and captured graphs of one model's step (body + routed head)."""

    def __init__(self, runner, vocab_limit: int, max_model_len: int, batch_sizes: Seq[int],
                 query_lens: Seq[int], graph_cls=CUDAGraph, pool=None):
        self.runner, self.vocab_limit = runner, vocab_limit
        self.batch_sizes, self.query_lens = sorted(batch_sizes), sorted(query_lens)
        self.graph_cls = graph_cls
        max_b, max_l = self.batch_sizes[-1], self.query_lens[-1]
        max_t, max_lanes = max_b * max_l, _num_lanes((max_b, max_l))
        self.max_blocks = -(-max_model_len // runner.block_size)
        self.inputs = StaticInputs([
            ("input_ids", (max_t,), torch.int64, 0),  # [T]
            ("positions", (max_t,), torch.int64, 0),  # [T]
            ("slot_mapping", (max_t,), torch.int64, -1),  # [T]
            ("last_idx", (max_b,), torch.int64, 0),  # [B] row of each lane's last token
            ("seeds", (max_b,), torch.int64, 0),  # [B]
            ("temperature", (max_b,), torch.float32, 0),  # [B]
            ("seq_lens", (max_lanes,), torch.int32, 0),  # [lanes]
            ("query_start_loc", (max_lanes + 1,), torch.int32, 0),  # [lanes + 1]
            ("block_tables", (max_lanes, self.max_blocks), torch.int32, runner.sink_block),  # last: copied by rows
        ], runner.device)
        self.host, self.dev = self.inputs.host, self.inputs.dev
        self.graphs: Dict[Tuple[int, int, bool], object] = {}
        self.pool = pool  # a torch.cuda graph pool handle (None: the graphs' own)
        self.router = None  # router params the graphs with a router were captured with

    # ---- bucket choice ----------------------------------------------------------------
    def bucket(self, q_lens: Seq[int]) -> Optional[Tuple[int, int]]:
        b = pick_bucket(self.batch_sizes, len(q_lens))
        l = pick_bucket(self.query_lens, max(q_lens))
        return None if b is None or l is None or b * l > MAX_GRAPH_TOKENS else (b, l)

    # ---- one step ---------------------------------------------------------------------
    def run(self, seqs: Seq, starts: List[int], ends: List[int], router, temperature: List[float],
            seeds: List[int]) -> Optional[StepOut]:
        """Positions [start, end) of each sequence through the graph of its bucket ->
        (pre-norm hidden [b, H], head [3, b] float64: tokens, top_prob, router score) on
        the device, or None when no bucket fits. The outputs are views of graph memory:
        read them before any other graph (of either model: they share a pool) replays
        or is captured.
        router: the router's params (a tuple of tensors) or None."""
        q_lens = [e - s for s, e in zip(starts, ends)]
        if min(q_lens) < 1:  # the padding layout gives every row to a lane only then
            raise ValueError(f"every sequence needs at least one new token, got query lengths {q_lens}")
        bucket = self.bucket(q_lens)
        if bucket is None:
            return None
        if router is not None:
            self.use_router(router)
        key = (*bucket, router is not None)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self._capture(key)
        self._fill(seqs, starts, ends, q_lens, bucket, temperature, seeds)
        hidden, head = graph.replay()
        return hidden[:len(seqs)], head[:, :len(seqs)]

    def _fill(self, seqs, starts, ends, q_lens, bucket, temperature, seeds) -> None:
        """Host staging <- this step's batch plus its padding; then one copy to the device."""
        self.inputs.writable()
        h = self.host
        b, t = len(seqs), sum(q_lens)
        handles = [s.handle for s in seqs]
        h.input_ids.numpy()[:t] = [tok for s, a, e in zip(seqs, starts, ends) for tok in s.token_ids[a:e]]
        h.positions.numpy()[:t] = np.concatenate([np.arange(a, e) for a, e in zip(starts, ends)])
        self.runner.bm.fill_slot_mapping(handles, np.asarray(starts, np.int64), np.asarray(ends, np.int64),
                                         h.slot_mapping.numpy()[:t])
        self.runner.bm.fill_block_tables(handles, h.block_tables.numpy()[:b], self.runner.sink_block)
        h.seq_lens.numpy()[:b] = ends
        np.cumsum(q_lens, out=h.query_start_loc.numpy()[1:b + 1])
        h.temperature.numpy()[:b] = temperature
        h.seeds.numpy()[:b] = seeds
        self._pad_and_copy(bucket, b, t)

    def _pad_and_copy(self, bucket, b: int, t: int) -> None:
        """Lanes [b, B) padding, [B, 2B) tail (see the module doc); copy to the device."""
        h = self.host
        num_b, num_l = bucket
        num_t, num_lanes, pad = num_b * num_l, _num_lanes(bucket), num_b - b
        tail = num_t - t - pad  # rows left for the tail lanes
        sink, bs = self.runner.sink_block, self.runner.block_size
        tail_lens = np.clip(tail - num_l * np.arange(num_lanes - num_b), 0, num_l)
        lens = np.concatenate([np.ones(pad, np.int64), tail_lens])  # lanes [b, num_lanes)
        pos = np.concatenate([np.zeros(pad, np.int64), np.arange(tail) % num_l])  # rows [t, num_t)
        h.input_ids.numpy()[t:num_t] = 0
        h.positions.numpy()[t:num_t] = pos
        h.slot_mapping.numpy()[t:num_t] = sink * bs + pos % bs
        h.block_tables.numpy()[b:num_lanes] = sink
        h.seq_lens.numpy()[b:num_lanes] = lens
        qsl = h.query_start_loc.numpy()
        qsl[0] = 0
        qsl[b + 1:num_lanes + 1] = t + np.cumsum(lens)
        h.last_idx.numpy()[:num_b] = qsl[1:num_b + 1] - 1
        h.temperature.numpy()[b:num_b] = 0.0
        h.seeds.numpy()[b:num_b] = 0
        # everything up to this bucket's block-table rows, in one copy
        self.inputs.copy(self.inputs.offsets["block_tables"] + h.block_tables[:num_lanes].nbytes)

    # ---- capture ----------------------------------------------------------------------
    def _step_fn(self, key) -> Callable[[], StepOut]:
        num_b, num_l, with_router = key
        num_t, num_lanes = num_b * num_l, _num_lanes(key[:2])
        runner, model = self.runner, self.runner.model
        router = self.router if with_router else None
        d = self.dev
        cfg = model.cfg
        splits = None  # the tail lanes must not change how the Triton kernel splits the keys
        if runner.ops.name == "triton" and num_l <= SPLIT_KV_MAX_Q:
            splits = split_kv_num_splits(num_b, num_l, cfg.num_heads, cfg.num_kv_heads, runner.device)
        meta = AttentionMetadata(
            slot_mapping=d.slot_mapping[:num_t], block_tables=d.block_tables[:num_lanes],
            seq_lens=d.seq_lens[:num_lanes], query_start_loc=d.query_start_loc[:num_lanes + 1],
            max_query_len=num_l, max_seq_len=self.max_blocks * runner.block_size, num_splits=splits,
        )
        ids, pos = d.input_ids[:num_t], d.positions[:num_t]
        last_idx, temperature, seeds = d.last_idx[:num_b], d.temperature[:num_b], d.seeds[:num_b]
        lm_head = model.lm_head.weight[:self.vocab_limit]

        def step() -> StepOut:
            hidden = model(runner.ops, ids, pos, runner.kv_cache, meta)[last_idx]
            tokens, top_prob, score = runner.ops.routed_head(hidden, model.norm.weight, model.norm.eps, lm_head,
                                                             router, temperature, seeds)
            return hidden, torch.stack([x.to(torch.float64) for x in (tokens, top_prob, score)])

        return step

    def use_router(self, router) -> None:
        """The router params (a tuple of tensors) graphs with a router read in place:
        another router's means new graphs."""
        if not _same_tensors(router, self.router):
            self.graphs = {k: g for k, g in self.graphs.items() if not k[2]}
            self.router = router

    def capture_all(self, with_router: bool) -> int:
        """Capture every bucket not yet captured, largest first (so the shared pool is
        sized by the first); -> how many. with_router: the graphs that run the router
        too (after use_router)."""
        keys = [(b, l, with_router) for b in reversed(self.batch_sizes) for l in reversed(self.query_lens)
                if b * l <= MAX_GRAPH_TOKENS]
        todo = [k for k in keys if k not in self.graphs]
        for key in todo:
            self._capture(key)
        return len(todo)

    @torch.inference_mode()
    def _capture(self, key):
        """Warm up twice on padding-only buffers (compiles every kernel; writes only the
        sink block), then capture; -> the graph, also kept in self.graphs."""
        self.inputs.writable()
        self._pad_and_copy(key[:2], 0, 0)
        fn = self._step_fn(key)
        for _ in range(self.graph_cls.warmup_runs):
            fn()
        if self.graph_cls is CUDAGraph:
            torch.cuda.synchronize(self.runner.device)
        graph = self.graphs[key] = self.graph_cls(fn, self.pool)
        return graph


def _same_tensors(a, b) -> bool:
    return b is not None and len(a) == len(b) and all(x is y for x, y in zip(a, b))


def _num_lanes(bucket: Tuple[int, int]) -> int:
    num_b, num_l = bucket
    return num_b if num_l == 1 else 2 * num_b
