"""KV store: write the new tokens' keys and values into the paged caches.

Token t goes to flat slot slot_mapping[t] = block * block_size + offset; negative slots
(padded lanes) are skipped. One Triton program per token copies its Hkv * D values;
`store_kvcache_cpu` does the copies in one call of citer's CPU kernel (csrc/cpu_kv_store.inc).
"""
import torch
import triton
import triton.language as tl

from . import cpu_ext


def store_kvcache_ref(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int32/int64, -1 = skip
) -> None:
    num_kv_heads, head_dim = k_cache.shape[-2:]
    k_flat = k_cache.view(-1, num_kv_heads, head_dim)
    v_flat = v_cache.view(-1, num_kv_heads, head_dim)
    slots = slot_mapping.long()
    valid = slots >= 0
    if not bool(valid.all()):
        slots, key, value = slots[valid], key[valid], value[valid]
    k_flat.index_copy_(0, slots, key.to(k_cache.dtype))
    v_flat.index_copy_(0, slots, value.to(v_cache.dtype))


def store_kvcache_cpu(key, value, k_cache, v_cache, slot_mapping) -> None:
    """store_kvcache_ref's contract in one kernel call where the layouts allow it."""
    if (cpu_ext.AVAILABLE and key.device.type == "cpu" and key.dtype == value.dtype == k_cache.dtype == v_cache.dtype
            and k_cache.dim() == 4 and k_cache.shape == v_cache.shape and k_cache.shape[2:] == key.shape[1:]
            and k_cache.is_contiguous() and v_cache.is_contiguous() and slot_mapping.is_contiguous()
            and key.dim() == 3 and value.shape == key.shape
            and all(x.stride(2) == 1 and x.stride(1) == x.shape[2] for x in (key, value))):
        cpu_ext.ext.store_kvcache(key, value, k_cache, v_cache, slot_mapping)
    else:
        store_kvcache_ref(key, value, k_cache, v_cache, slot_mapping)


@triton.jit
def _store_kvcache_kernel(
    key_ptr,  # [T, Hkv, D], token stride key_stride, heads and dims contiguous
    value_ptr,  # [T, Hkv, D], token stride value_stride, heads and dims contiguous
    k_cache_ptr,  # [num_blocks, block_size, Hkv, D] contiguous
    v_cache_ptr,  # [num_blocks, block_size, Hkv, D] contiguous
    slot_mapping_ptr,  # [T] int32/int64
    key_stride,
    value_stride,
    HD: tl.constexpr,  # Hkv * D
    BLOCK: tl.constexpr,  # next power of two >= HD
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = (offs < HD) & (slot >= 0)
    k = tl.load(key_ptr + t * key_stride + offs, mask=mask)
    v = tl.load(value_ptr + t * value_stride + offs, mask=mask)
    tl.store(k_cache_ptr + slot * HD + offs, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + slot * HD + offs, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kvcache_triton(key, value, k_cache, v_cache, slot_mapping) -> None:
    num_tokens, num_kv_heads, head_dim = key.shape
    hd = num_kv_heads * head_dim
    for name, t in (("key", key), ("value", value)):
        if t.stride(-1) != 1 or t.stride(-2) != head_dim:
            raise ValueError(f"{name} must have contiguous heads and dims, got strides {t.stride()}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    if num_tokens == 0:
        return
    _store_kvcache_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping, key.stride(0), value.stride(0),
        HD=hd, BLOCK=triton.next_power_of_2(hd),
    )
