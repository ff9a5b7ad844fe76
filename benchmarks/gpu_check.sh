#!/usr/bin/env bash
# One command for a lent CUDA machine: GPU tests (kernels compiled for real vs references,
# flash-attn cross-check if installed, CUDA-graph replay vs eager, engine parity on CUDA),
# then the kernel and end-to-end decode benchmarks. Prints one table last per benchmark;
# record results in BENCHMARKS.md.
#   bash benchmarks/gpu_check.sh            (from anywhere; installs citer in editable mode
#                                            with $PY first if it is not importable)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
$PY -c "import citer._C, citer.engine" 2>/dev/null || $PY -m pip install -q --no-build-isolation --no-deps -e . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
status=0
$PY -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py tests/test_cuda_graph_gpu.py tests/test_kernels.py tests/test_engine_triton.py tests/test_cuda_graph.py || status=1
$PY benchmarks/kernels.py || status=1
$PY benchmarks/decode_gpu.py || status=1
exit $status
