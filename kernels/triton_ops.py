"""The Triton backend's ops (same signatures as the torch references)."""
from .kv_store import store_kvcache_triton
from .ops import Ops
from .paged_attention import paged_attention_triton
from .rmsnorm import rms_norm_triton
from .routed_head import routed_head_triton

OPS = Ops("triton", store_kvcache_triton, paged_attention_triton, rms_norm_triton, routed_head_triton)
