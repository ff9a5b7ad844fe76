"""What every Triton kernel wrapper asks of its device: the SM count, and when dots run in fp32.

- `sm_count(device)`: multiprocessors of a CUDA device (cached per device index); the
  split counts that spread a small batch over the whole GPU are sized from it.
- `dot_fp32(dtype)`: True when tl.dot must take float32 operands with
  input_precision="ieee": fp32 tensors on a GPU (exact parity with the references), and
  every dtype under the interpreter (TRITON_INTERPRET=1), whose bf16/fp16 arithmetic is
  unreliable. Otherwise fp16/bf16 operands with fp32 accumulation.
"""
import functools
import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (read at call time)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _sm_count(index)


def dot_fp32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or interpreting()
