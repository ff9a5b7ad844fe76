"""flash-attn as an optional paged-attention op (same contract as paged_attention_ref).

flash-attn's varlen kernel reads the same cache layout ([num_blocks, block_size, Hkv,
D], int32 block tables) and takes the same packed queries, so it drops in for the
Triton kernel when `Engine(..., attention="flash-attn")` asks for it. Its causal mask is
aligned bottom-right, as ours is: query row i of a lane with q_len queries sits at
position seq_len - q_len + i. Its rules, checked up front by `check_flash_attn`: a CUDA
device, fp16 or bf16, and pages of a multiple of 256 tokens (flash-attn 2's paged KV).
It is also the cross-check of the Triton kernel in tests/test_kernels_gpu.py.
"""
import torch
import torch.nn.functional as F

FLASH_PAGE_MULTIPLE = 256
ATTENTION_CHOICES = ("flash-attn",)


def check_flash_attn(device: torch.device, dtype: torch.dtype, block_size: int) -> None:
    """Raise, naming the problem, unless flash-attn can serve this engine."""
    if device.type != "cuda":
        raise ValueError(f"attention='flash-attn' needs a CUDA device, not {device}")
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"attention='flash-attn' needs dtype float16 or bfloat16, not {dtype}")
    if block_size % FLASH_PAGE_MULTIPLE:
        raise ValueError(f"attention='flash-attn' needs block_size a multiple of {FLASH_PAGE_MULTIPLE} "
                         f"(flash-attn's paged KV cache), got {block_size}")
    try:
        import flash_attn  # noqa: F401
    except ImportError as e:
        raise RuntimeError("attention='flash-attn' but the flash_attn package is not importable") from e


def paged_attention_flash(
    q: torch.Tensor,  # [T, Hq, D] fp16/bf16
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [B] int32, context length incl. the new tokens
    query_start_loc: torch.Tensor,  # [B + 1] int32
    scale: float,
    max_query_len: int,
    max_seq_len: int,
    num_splits=None,  # the Triton kernel's split-KV count; flash-attn picks its own
) -> torch.Tensor:  # [T, Hq, D]
    from flash_attn import flash_attn_varlen_func

    cu_seqlens_k = F.pad(torch.cumsum(seq_lens, 0, dtype=torch.int32), (1, 0))  # on device: graph-safe
    return flash_attn_varlen_func(q, k_cache, v_cache, query_start_loc, cu_seqlens_k, max_query_len, max_seq_len,
                                  softmax_scale=scale, causal=True, block_table=block_tables)
