#!/usr/bin/env bash
# One command for a lent CUDA machine: GPU tests (kernels compiled for real vs references,
# flash-attn cross-check if installed, CUDA-graph replay vs eager, engine parity on CUDA),
# then the kernel and end-to-end decode benchmarks. Prints one table last per benchmark;
# record results in BENCHMARKS.md.
#   bash benchmarks/gpu_check.sh [tests] [kernels] [decode]     (default: all three)
# Installs citer in editable mode with $PY first if it is not importable. Sections can
# run in separate calls when one call's time is short (tests take the longest: every
# kernel variant compiles once).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
sections=${*:-tests kernels decode}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, triton, transformers, setuptools; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'setuptools', setuptools.__version__, 'cuda', torch.cuda.is_available())"
$PY -c "import citer._C, citer.engine" 2>/dev/null || $PY -m pip install -q --no-build-isolation --no-deps -e . || exit 1
status=0
for s in $sections; do
    echo "=== $s ($(date -u +%H:%M:%S))"
    case $s in
        tests) $PY -m pytest -q -p no:cacheprovider --durations=15 tests/test_kernels_gpu.py tests/test_cuda_graph_gpu.py \
                   tests/test_kernels.py tests/test_engine_triton.py tests/test_cuda_graph.py || status=1 ;;
        kernels) $PY benchmarks/kernels.py || status=1 ;;
        decode) $PY benchmarks/decode_gpu.py || status=1 ;;
        *) echo "unknown section $s (tests, kernels, decode)"; status=1 ;;
    esac
done
exit $status
