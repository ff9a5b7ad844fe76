"""RMSNorm with the residual add fused (the Llama/Qwen pre-norm pattern).

With a residual: residual_out = x + residual; out = rmsnorm(residual_out) * weight.
The add happens in the input dtype and the normalisation in float32, exactly as
transformers' LlamaRMSNorm / Qwen2RMSNorm do, so results match them bit for bit on CPU.
"""
from typing import Optional, Tuple

import torch


def rms_norm_ref(
    x: torch.Tensor,  # [T, H]
    weight: torch.Tensor,  # [H]
    eps: float,
    residual: Optional[torch.Tensor] = None,  # [T, H]
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    if residual is not None:
        x = x + residual
        residual = x
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype), residual
