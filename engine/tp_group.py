"""A tensor-parallel LLM: the engine's process drives rank 0, worker processes the rest.

As vLLM's single-node executor and SGLang's workers do over torch.distributed (NCCL on
GPUs, gloo on CPU): `TPGroup` spawns ranks 1..N-1 (or, launched by torchrun, finds them in
the default process group), each loads only its slices of the checkpoint (tp.py) and
allocates its part of the KV pool, and then runs `worker_loop`: each step's inputs come
by one broadcast from rank 0 (the packed token ids, positions, slots, block tables and
lengths, then the head's per-row settings), every rank runs the same forward and head
with their all-reduces and all-gathers, and rank 0 alone keeps the result. `TPModel` is
rank 0's model as the ModelRunner sees it: the same calls as a DecoderLM, each first
broadcast to the workers.

Failures: collectives have a timeout (EngineArgs.tp_timeout); a worker that dies or
errors makes the next step on rank 0 raise TPWorkerError naming the rank and its exit
code, and the group is shut down (every worker process terminated, none left behind).
Later steps raise at once. `close()` (also at interpreter exit) stops the workers.
"""
import datetime
import os
import socket
import weakref
from dataclasses import dataclass
from typing import Any, List, Optional

import torch

from .models.attention import AttentionMetadata
from .models.head import HeadSpec
from .models.loader import load_model
from .models.quantize import quantize_int8_
from .models.tp import Shard


class TPWorkerError(RuntimeError):
    """A tensor-parallel worker died or failed; the group is shut down."""


@dataclass(frozen=True)
class TPSpec:
    """What every rank needs to build its slice: the checkpoint and the KV pool's shape."""

    path: str
    world: int
    dtype: str
    device: str  # "cpu", or "cuda" (rank r uses cuda:r)
    max_positions: int
    vocab_limit: Optional[int]
    num_blocks: int  # the pool's blocks, the sink block aside
    block_size: int
    backend: str  # the ops: "torch" | "triton"
    timeout: float
    quantization: Optional[str] = None

    def rank_device(self, rank: int) -> torch.device:
        """CPU, or the rank's GPU on its node (LOCAL_RANK under torchrun, else the rank)."""
        if self.device == "cpu":
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))


def _init(spec: TPSpec, rank: int, init_method: str) -> None:
    import torch.distributed as dist

    if spec.device != "cpu":
        torch.cuda.set_device(spec.rank_device(rank))
    dist.init_process_group("gloo" if spec.device == "cpu" else "nccl", init_method=init_method, rank=rank,
                            world_size=spec.world, timeout=datetime.timedelta(seconds=spec.timeout))


def _load(spec: TPSpec, rank: int):
    model, _ = load_model(spec.path, spec.rank_device(rank), spec.dtype, max_positions=spec.max_positions,
                          vocab_limit=spec.vocab_limit, shard=Shard(rank, spec.world))
    return quantize_int8_(model) if spec.quantization == "int8" else model


def _kv_pool(model, spec: TPSpec, device) -> list:
    c = model.cfg
    shape = (spec.num_blocks + 1, spec.block_size, c.num_kv_heads, c.head_dim)
    dtype = model.norm.weight.dtype
    return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(c.num_layers)]


def worker_main(spec: TPSpec, rank: int, init_method: Optional[str]) -> None:
    """A worker rank's process: init, load its slice, serve steps until told to stop."""
    import torch.distributed as dist

    from citer.kernels.ops import get_ops

    torch.set_num_threads(max(1, torch.get_num_threads()))
    if init_method is not None:
        _init(spec, rank, init_method)
    device = spec.rank_device(rank)
    model = _load(spec, rank)
    kv = _kv_pool(model, spec, device)
    worker_loop(model, kv, get_ops(spec.backend), device)
    dist.destroy_process_group()


@torch.inference_mode()
def worker_loop(model, kv, ops, device) -> None:
    hidden = None
    while True:
        msg = _recv()
        if msg[0] == "stop":
            return
        if msg[0] == "forward":
            _, ids, pos, meta, rows = msg
            meta = AttentionMetadata(**{k: (torch.as_tensor(v).to(device) if k in _TENSOR_FIELDS else v)
                                        for k, v in meta.items()})
            hidden = model(ops, torch.as_tensor(ids).to(device), torch.as_tensor(pos).to(device), kv, meta,
                           None if rows is None else torch.as_tensor(rows).to(device))
        elif msg[0] == "head":
            _, fields, row_idx = msg
            h = hidden if row_idx is None else hidden[torch.as_tensor(row_idx).to(device)]
            model.head(ops, h, HeadSpec(**fields))


_TENSOR_FIELDS = ("slot_mapping", "block_tables", "seq_lens", "query_start_loc")


def _send(msg) -> None:
    import torch.distributed as dist

    dist.broadcast_object_list([msg], src=0)


def _recv():
    import torch.distributed as dist

    box = [None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _host(t):
    return None if t is None else t.detach().cpu().numpy()


class TPModel:
    """Rank 0's slice as the ModelRunner calls it: each call is broadcast to the workers first."""

    def __init__(self, local, group: "TPGroup"):
        self.local, self.group = local, group

    def __getattr__(self, name):
        return getattr(self.local, name)

    def __call__(self, ops, input_ids, positions, kv_cache, meta: AttentionMetadata, rows=None):
        fields = {k: (_host(getattr(meta, k)) if k in _TENSOR_FIELDS else getattr(meta, k))
                  for k in AttentionMetadata.__dataclass_fields__}
        self.group.send(("forward", _host(input_ids), _host(positions), fields, _host(rows)))
        return self.group.guard(lambda: self.local(ops, input_ids, positions, kv_cache, meta, rows))

    def head(self, ops, hidden, spec: HeadSpec, phase=None, row_idx=None):
        t = spec.temperature
        fields = dict(temperature=t.tolist() if isinstance(t, torch.Tensor) else list(t),
                      seeds=spec.seeds.tolist() if isinstance(spec.seeds, torch.Tensor) else list(spec.seeds),
                      filters=spec.filters, router=None, want_probs=spec.want_probs,
                      want_logprobs=spec.want_logprobs)
        self.group.send(("head", fields, row_idx))
        return self.group.guard(lambda: self.local.head(ops, hidden, spec, phase))


class TPGroup:
    def __init__(self, spec: TPSpec):
        import torch.distributed as dist
        import torch.multiprocessing as mp

        self.spec, self.procs, self.broken = spec, [], None
        if dist.is_initialized():  # launched by torchrun: the other ranks run citer.engine.tp_group.main()
            if dist.get_world_size() != spec.world or dist.get_rank() != 0:
                raise ValueError(f"llm_tensor_parallel_size={spec.world} under torchrun needs a world of that size, "
                                 f"the engine on rank 0 (world {dist.get_world_size()}, rank {dist.get_rank()})")
            _send(spec)  # the workers learn what to load (the KV pool's size is known only here)
            self.owns_group = False
        else:
            init_method = f"tcp://127.0.0.1:{_free_port()}"
            ctx = mp.get_context("spawn")
            self.procs = [ctx.Process(target=worker_main, args=(spec, r, init_method), daemon=True,
                                      name=f"citer-tp-rank{r}") for r in range(1, spec.world)]
            for p in self.procs:
                p.start()
            weakref.finalize(self, _terminate, self.procs)
            try:
                _init(spec, 0, init_method)
            except Exception as e:
                _terminate(self.procs)
                raise TPWorkerError(f"tensor-parallel group of {spec.world} did not form: {e}") from e
            self.owns_group = True
        self.model = TPModel(_load(spec, 0), self)

    def send(self, msg) -> None:
        self.guard(lambda: _send(msg))

    def guard(self, fn):
        """Run a step's part; a worker's death or error fails it with a clear error."""
        if self.broken:
            raise TPWorkerError(self.broken)
        try:
            return fn()
        except Exception as e:
            dead = [(p.name, p.exitcode) for p in self.procs if not p.is_alive()]
            what = (", ".join(f"{n} exited with code {c}" for n, c in dead) if dead
                    else f"a collective failed or timed out after {self.spec.timeout:g} s")
            self.broken = f"tensor-parallel LLM: {what}; the group is shut down ({type(e).__name__}: {e})"
            self.close()
            raise TPWorkerError(self.broken) from e

    def close(self) -> None:
        import torch.distributed as dist

        if self.procs and all(p.is_alive() for p in self.procs) and not self.broken:
            try:
                _send(("stop",))
            except Exception:
                pass
        for p in self.procs:
            p.join(timeout=5)
        _terminate(self.procs)
        if self.owns_group and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass
            self.owns_group = False


def _terminate(procs: List[Any]) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(backend: str = "nccl") -> None:
    """A worker rank under torchrun: joins the default process group (set up here if it is
    not yet), learns from rank 0 what to load, and serves steps until rank 0 stops it.

        torchrun --nproc-per-node 4 my_server.py      # rank 0 builds Engine(..., llm_tensor_parallel_size=4)
        # in my_server.py, on ranks > 0:  from citer.engine.tp_group import main; main()
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend)
    spec = _recv()
    worker_main(spec, dist.get_rank(), None)


if __name__ == "__main__":
    main(os.environ.get("CITER_TP_BACKEND", "nccl"))
