"""citer.kernels: the engine's hot-path ops.

Each op has a pure-torch reference (what runs on CPU, and what tests compare the Triton
kernels against) and its Triton kernel: kv_store.py, rmsnorm.py, routed_head.py (with
the token choice from full logits in sampling.py), paged_attention.py (its kernels in
paged_attention_kernels.py); triton_utils.py holds what the wrappers ask of the device.
`citer.kernels.ops` picks the set an engine uses, once, from the backend, with the
capability flags the engine reads (and swaps in flash-attn's paged attention when
asked, see flash_attention.py). Nothing here imports the rest of citer.
"""
