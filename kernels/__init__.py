"""citer.kernels: the engine's hot-path ops.

Each op has a pure-torch reference (what runs on CPU, and what tests compare the Triton
kernels against) and its Triton kernel in the same file. `citer.kernels.ops` picks the
set an engine uses, once, from the backend (and swaps in flash-attn's paged attention
when asked, see flash_attention.py).
"""
