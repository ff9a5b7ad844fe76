"""CUDA graphs for the steady-state steps: buckets, static buffers, padding lanes, capture.

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
lane, so padding cannot reach a real row. Graphs are captured at a bucket's first use
(or all at once by Engine.capture_cuda_graphs), after two eager warm-up runs on
padding-only buffers (Triton compiles and cuBLAS picks its kernels then, never during
capture), and share one memory pool.

This module knows nothing of models: the model runner packs the real lanes (the same
pack_batch as its eager step) and gives the step function to capture.
`graph_cls` is what captures: CUDAGraph on a GPU; EagerGraph re-runs the captured
function on the static buffers, which lets the CPU tests check the padding and buffer
logic under the Triton interpreter (the GPU tests check real capture and replay).
"""
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Sequence as Seq, Tuple

import numpy as np
import torch

from .batch import HostBatch

MAX_GRAPH_TOKENS = 2048  # buckets with more token rows (B x L) run eagerly: big graphs, rare steps

Bucket = Tuple[int, int]  # (batch B, query length L)
GraphKey = Tuple[int, int, bool]  # (B, L, with a router)


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


def num_lanes(bucket: Bucket) -> int:
    num_b, num_l = bucket
    return num_b if num_l == 1 else 2 * num_b


class CUDAGraph:
    """fn captured once into a torch.cuda.CUDAGraph; replay() re-launches its kernels."""

    warmup_runs = 2

    def __init__(self, fn: Callable, pool):
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = fn()

    def replay(self):
        self.graph.replay()
        return self.out


class EagerGraph:
    """Stand-in with CUDAGraph's interface that calls fn again at every replay (CPU tests)."""

    warmup_runs = 0  # nothing compiles or is recorded

    def __init__(self, fn: Callable, pool):
        self.fn = fn

    def replay(self):
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


class StepGraphs:
    """The static inputs and captured graphs of one model's step."""

    def __init__(self, batch_sizes: Seq[int], query_lens: Seq[int], max_blocks: int, sink_block: int,
                 block_size: int, device: torch.device, graph_cls=CUDAGraph, pool=None,
                 extra_query_lens: Seq[int] = ()):
        # extra_query_lens: buckets that serve only some workloads (the SLM's 2-token
        # catch-up after speculative drafts all stood): captured by keys(extra=True) only
        self.batch_sizes, self.query_lens = sorted(batch_sizes), sorted(set(query_lens) | set(extra_query_lens))
        self.extra_query_lens = set(extra_query_lens) - set(query_lens)
        self.max_blocks, self.sink_block, self.block_size = max_blocks, sink_block, block_size
        self.graph_cls, self.pool = graph_cls, pool  # pool: a torch.cuda graph pool handle (None: the graphs' own)
        max_b, max_l = self.batch_sizes[-1], self.query_lens[-1]
        max_t, max_lanes = max_b * max_l, num_lanes((max_b, max_l))
        self.inputs = StaticInputs([
            ("input_ids", (max_t,), torch.int64, 0),  # [T]
            ("positions", (max_t,), torch.int64, 0),  # [T]
            ("slot_mapping", (max_t,), torch.int64, -1),  # [T]
            ("last_idx", (max_b,), torch.int64, 0),  # [B] row of each lane's last token
            ("seeds", (max_b,), torch.int64, 0),  # [B]
            ("temperature", (max_b,), torch.float32, 0),  # [B]
            ("seq_lens", (max_lanes,), torch.int32, 0),  # [lanes]
            ("query_start_loc", (max_lanes + 1,), torch.int32, 0),  # [lanes + 1]
            ("block_tables", (max_lanes, max_blocks), torch.int32, sink_block),  # last: copied by rows
        ], device)
        self.host, self.dev = self.inputs.host, self.inputs.dev
        self.graphs: Dict[GraphKey, object] = {}
        self.router = None  # router params the graphs with a router were captured with

    def bucket(self, q_lens: Seq[int]) -> Optional[Bucket]:
        """The bucket of a step with these query lengths, or None when none fits (eager)."""
        if min(q_lens) < 1:  # the padding layout gives every row to a lane only then
            raise ValueError(f"every sequence needs at least one new token, got query lengths {list(q_lens)}")
        b = pick_bucket(self.batch_sizes, len(q_lens))
        l = pick_bucket(self.query_lens, max(q_lens))
        return None if b is None or l is None or b * l > MAX_GRAPH_TOKENS else (b, l)

    def keys(self, with_router: bool, extra: bool = False) -> List[GraphKey]:
        """Every bucket's key, largest first (so the first capture sizes the shared pool);
        extra: the extra query lengths too, and the all-row (verifying) variants."""
        keys = [(b, l, with_router) for b in reversed(self.batch_sizes) for l in reversed(self.query_lens)
                if b * l <= MAX_GRAPH_TOKENS and (extra or l not in self.extra_query_lens)]
        if extra:  # a verifying catch-up has at least 2 rows per lane
            keys += [k + (True,) for k in keys if k[1] > 1]
        return keys

    def views(self, bucket: Bucket) -> SimpleNamespace:
        """The device buffers, cut to a bucket: what a captured step reads."""
        num_b, num_l = bucket
        num_t, lanes, d = num_b * num_l, num_lanes(bucket), self.dev
        return SimpleNamespace(
            input_ids=d.input_ids[:num_t], positions=d.positions[:num_t], slot_mapping=d.slot_mapping[:num_t],
            block_tables=d.block_tables[:lanes], seq_lens=d.seq_lens[:lanes],
            query_start_loc=d.query_start_loc[:lanes + 1], last_idx=d.last_idx[:num_b],
            temperature=d.temperature[:num_b], seeds=d.seeds[:num_b], max_seq_len=self.max_blocks * self.block_size)

    def use_router(self, router) -> None:
        """The router params (a tuple of tensors) graphs with a router read in place:
        another router's means new graphs."""
        if not _same_tensors(router, self.router):
            self.graphs = {k: g for k, g in self.graphs.items() if not k[2]}
            self.router = router

    def get(self, key: GraphKey, make_step: Callable[[GraphKey], Callable]):
        """The graph of key, captured now if it is not yet: two warm-ups on padding-only
        buffers (compiles every kernel; writes only the sink block), then the capture."""
        graph = self.graphs.get(key)
        if graph is not None:
            return graph
        self.inputs.writable()
        self.stage(key[:2], 0, 0)
        fn = make_step(key)
        with torch.inference_mode():
            for _ in range(self.graph_cls.warmup_runs):
                fn()
            if self.graph_cls is CUDAGraph:
                torch.cuda.synchronize(self.dev.input_ids.device)
            graph = self.graphs[key] = self.graph_cls(fn, self.pool)
        return graph

    def host_batch(self) -> HostBatch:
        """The host staging buffers as pack_batch's output (call writable() first)."""
        h = self.host
        return HostBatch(h.input_ids.numpy(), h.positions.numpy(), h.slot_mapping.numpy(), h.block_tables.numpy(),
                         h.seq_lens.numpy(), h.query_start_loc.numpy())

    def stage(self, bucket: Bucket, b: int, t: int, temperature=(), seeds=()) -> None:
        """Lanes [0, b) hold the step's t packed tokens (pack_batch into host_batch());
        add the sampling inputs, padding lanes [b, B) and tail lanes [B, 2B) (see the
        module doc), then copy to the device in one copy."""
        h = self.host
        num_b, num_l = bucket
        num_t, lanes, pad = num_b * num_l, num_lanes(bucket), num_b - b
        tail = num_t - t - pad  # rows left for the tail lanes
        sink, bs = self.sink_block, self.block_size
        tail_lens = np.clip(tail - num_l * np.arange(lanes - num_b), 0, num_l)
        lens = np.concatenate([np.ones(pad, np.int64), tail_lens])  # lanes [b, lanes)
        pos = np.concatenate([np.zeros(pad, np.int64), np.arange(tail) % num_l])  # rows [t, num_t)
        h.input_ids.numpy()[t:num_t] = 0
        h.positions.numpy()[t:num_t] = pos
        h.slot_mapping.numpy()[t:num_t] = sink * bs + pos % bs
        h.block_tables.numpy()[b:lanes] = sink
        h.seq_lens.numpy()[b:lanes] = lens
        qsl = h.query_start_loc.numpy()
        qsl[0] = 0
        qsl[b + 1:lanes + 1] = t + np.cumsum(lens)
        h.last_idx.numpy()[:num_b] = qsl[1:num_b + 1] - 1
        h.temperature.numpy()[:b] = temperature
        h.seeds.numpy()[:b] = seeds
        h.temperature.numpy()[b:num_b] = 0.0
        h.seeds.numpy()[b:num_b] = 0
        # everything up to this bucket's block-table rows, in one copy
        self.inputs.copy(self.inputs.offsets["block_tables"] + h.block_tables[:lanes].nbytes)


def _same_tensors(a, b) -> bool:
    return b is not None and len(a) == len(b) and all(x is y for x, y in zip(a, b))
