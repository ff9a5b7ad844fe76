"""A GPU step-cost model from model shapes: what one forward of a batch costs on a device.

    time = max(bytes / (bandwidth x bw_eff), flops / (peak x flops_eff)) + launch floor + host
           (+ 2 all-reduces per layer with tensor parallelism)

bytes: every weight once (the embedding's rows read are negligible; the lm_head is read
whole), the KV cache each row's attention reads (its context) and the KV it writes.
flops: 2 x (non-embedding parameters) per token, 2 x vocab x hidden per head row, and
attention: 4 x heads x head_dim x context per token and layer (scores and values).

Device figures and where they come from (stated here, used everywhere):
  H100 SXM  3.35 TB/s HBM3, 989 TFLOP/s dense bf16 (NVIDIA H100 datasheet)
  H200 SXM  4.8 TB/s HBM3e, 989 TFLOP/s dense bf16 (NVIDIA H200 datasheet)
  A100 80GB 2.039 TB/s, 312 TFLOP/s (the calibration check below)
  bw_eff 0.70: gpt-fast's Llama-2-7B bf16 batch-1 decode on an A100-80GB reads 1397 GB/s
    (104.9 tok/s, README), 68.5% of peak; its Llama-3-8B 1412 GB/s (94.25 tok/s).
  flops_eff 0.60: a large bf16 GEMM reaches 60-70% of dense peak on Hopper (cuBLAS);
    0.6 is the lower end, since catch-up GEMMs are not large.
  floors: with CUDA graphs one replay of a whole step, 30 us; eager, 6 us per kernel
    launch x (12 kernels per layer + 6), the PyTorch eager launch cost.
  host: 0.2 ms of Python per model step (scheduling, packing, events; an assumption for a
    GPU host, not measured here).
  all-reduce (tensor parallelism): ring, 2 (n-1)/n x bytes / link + 8 us; NVLink 4th gen
    450 GB/s per direction (H100 SXM, 900 GB/s total), PCIe Gen5 x16 50 GB/s effective.
Check (calibration_check): the model at A100 figures predicts gpt-fast's two batch-1
numbers within 10%. `gpu_check.sh costmodel` times real steps on a lent GPU and prints
model against measured.
"""
from dataclasses import dataclass
from typing import Dict, Sequence, Tuple


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    qkv_bias: bool = True
    head_dim: int = 0  # 0: hidden // heads

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def layer_params(self) -> int:
        h, q, kv = self.hidden, self.heads * self.hd, self.kv_heads * self.hd
        attn = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.qkv_bias else 0)
        return attn + 3 * h * self.intermediate + 2 * h  # + the two RMSNorms

    @property
    def body_params(self) -> int:
        """Parameters every token's forward multiplies by (layers and the final norm)."""
        return self.layers * self.layer_params + self.hidden

    @property
    def lm_head_params(self) -> int:
        return self.vocab * self.hidden

    def weight_bytes(self, dtype_bytes: int = 2, tp: int = 1) -> int:
        """What one forward reads of the weights, per GPU (the embedding's rows aside)."""
        return (self.body_params + self.lm_head_params) * dtype_bytes // tp

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.layers * self.kv_heads * self.hd * dtype_bytes


QWEN2 = {
    "0.5b": Shape("Qwen2-0.5B", 896, 24, 14, 2, 4864, 151936, True),
    "1.5b": Shape("Qwen2-1.5B", 1536, 28, 12, 2, 8960, 151936, True),
    "7b": Shape("Qwen2-7B", 3584, 28, 28, 4, 18944, 152064, False),
    "72b": Shape("Qwen2-72B", 8192, 80, 64, 8, 29568, 152064, False),
}
LLAMA = {"2-7b": Shape("Llama-2-7B", 4096, 32, 32, 32, 11008, 32000, False, qkv_bias=False),
         "3-8b": Shape("Llama-3-8B", 4096, 32, 32, 8, 14336, 128256, False, qkv_bias=False)}


@dataclass(frozen=True)
class Device:
    name: str
    bandwidth: float  # bytes/s
    peak_flops: float  # dense bf16 FLOP/s
    link: float = 450e9  # bytes/s per direction between GPUs (tensor parallelism)
    bw_eff: float = 0.70
    flops_eff: float = 0.60
    graph_floor: float = 30e-6  # s per replayed step
    launch: float = 6e-6  # s per eager kernel launch
    host: float = 0.2e-3  # s of host work per model step
    allreduce_latency: float = 8e-6


DEVICES = {
    "H100": Device("H100 SXM", 3.35e12, 989e12),
    "H200": Device("H200 SXM", 4.8e12, 989e12),
    "A100": Device("A100 80GB", 2.039e12, 312e12, link=300e9),
}
PCIE_LINK = 50e9


@dataclass(frozen=True)
class Step:
    """One forward: per row (new tokens, context after them), and how many rows get the head."""

    rows: Tuple[Tuple[int, int], ...]
    head_rows: int


def step_bytes(shape: Shape, step: Step, dtype_bytes: int = 2, tp: int = 1) -> int:
    kv = shape.kv_bytes_per_token(dtype_bytes) // tp
    read = sum(ctx for _, ctx in step.rows) * kv
    write = sum(new for new, _ in step.rows) * kv
    return shape.weight_bytes(dtype_bytes, tp) + read + write


def step_flops(shape: Shape, step: Step, tp: int = 1) -> int:
    tokens = sum(new for new, _ in step.rows)
    # attention: each new token at position p attends over p + 1 keys; rows' new tokens are its last ones
    att_keys = sum(new * ctx - new * (new - 1) // 2 for new, ctx in step.rows)
    attn = 4 * shape.heads * shape.hd * att_keys * shape.layers
    return (2 * shape.body_params * tokens + 2 * shape.lm_head_params * step.head_rows + attn) // tp


def step_time(shape: Shape, step: Step, device: Device, graphs: bool = True, dtype_bytes: int = 2, tp: int = 1,
              link: float = None) -> float:
    """Seconds for one forward (see the module doc)."""
    if not step.rows:
        return 0.0
    memory = step_bytes(shape, step, dtype_bytes, tp) / (device.bandwidth * device.bw_eff)
    compute = step_flops(shape, step, tp) / (device.peak_flops * device.flops_eff)
    floor = device.graph_floor if graphs else device.launch * (12 * shape.layers + 6)
    t = max(memory, compute) + floor + device.host
    if tp > 1:
        t += 2 * shape.layers * allreduce_time(sum(n for n, _ in step.rows) * shape.hidden * dtype_bytes, tp,
                                               link or device.link, device.allreduce_latency)
    return t


def allreduce_time(nbytes: int, tp: int, link: float, latency: float) -> float:
    """A ring all-reduce of nbytes over tp GPUs."""
    return 2 * (tp - 1) / tp * nbytes / link + latency


def decode_step(batch: int, context: int) -> Step:
    return Step(tuple((1, context) for _ in range(batch)), batch)


def calibration_check() -> Dict[str, Tuple[float, float]]:
    """gpt-fast's batch-1 bf16 decode on an A100-80GB (README: tokens/s) against the model
    -> name: (measured ms/token, modelled ms/token)."""
    a100 = DEVICES["A100"]
    measured = {"Llama-2-7B": 1e3 / 104.9, "Llama-3-8B": 1e3 / 94.25}
    out = {}
    for name, shape in (("Llama-2-7B", LLAMA["2-7b"]), ("Llama-3-8B", LLAMA["3-8b"])):
        out[name] = (measured[name], 1e3 * step_time(shape, decode_step(1, 64), a100))
    return out


def tp_table(shape: Shape, device: Device, tps: Sequence[int] = (1, 2, 4, 8), batch: int = 1,
             context: int = 1024) -> Dict[int, Dict[str, float]]:
    """Per TP size: all-reduce bytes per step, their time on NVLink and on PCIe, and the step
    time on each (the paper computation issue 21 asks for, e.g. Qwen2-72B)."""
    out = {}
    step = decode_step(batch, context)
    for tp in tps:
        nbytes = batch * shape.hidden * 2
        row = {"allreduce_bytes_per_step": 2 * shape.layers * nbytes * (tp > 1)}
        for name, link in (("nvlink", device.link), ("pcie", PCIE_LINK)):
            comm = 2 * shape.layers * allreduce_time(nbytes, tp, link, device.allreduce_latency) if tp > 1 else 0.0
            row[f"comm_ms_{name}"] = 1e3 * comm
            row[f"step_ms_{name}"] = 1e3 * step_time(shape, step, device, tp=tp, link=link)
        out[tp] = row
    return out
