"""citer.kernels: the engine's hot-path ops.

Each op has a pure-torch reference (what runs on CPU, and what tests compare the Triton
kernels against) and, where written, a Triton kernel in the same file. `citer.kernels.ops`
picks one per call from the backend (see backend.py).
"""
