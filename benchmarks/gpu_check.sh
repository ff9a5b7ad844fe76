#!/usr/bin/env bash
# The checks and benchmarks for a lent CUDA machine. Record results in BENCHMARKS.md.
#
#   bash benchmarks/gpu_check.sh quick          one call of at most 7 minutes (cold Triton cache):
#       versions; every kernel compiled and checked against its torch reference at a real
#       shape; CUDA-graph replay == eager (SLM decode step, LLM catch-up buckets); engine ==
#       transformers greedy on CUDA; the headline numbers (batch-1 decode step with graphs vs
#       the weight-bandwidth bound at the Qwen2-0.5B / 1.5B shapes, the router's share of the
#       SLM step, routed vs LLM-only); a summary table last. Each part runs under its own
#       timeout, so a hang or a failure in one still prints the others.
#   bash benchmarks/gpu_check.sh [tests] [kernels] [decode] [compare] [compare7b] [costmodel]
#       the full sections, for later calls: every GPU test, the kernel benchmarks, the decode
#       benchmark (default: these three), the policy comparison replayed at the Qwen2-0.5B /
#       1.5B shapes (compare) and at 0.5B / 7B (compare7b), the cost model against measured
#       decode and catch-up steps at the 0.5B and 1.5B shapes (costmodel).
#
# Installs citer in editable mode with $PY first if it is not importable. Logs (and the
# headline's JSON) go to $CITER_GPU_LOG_DIR (default: a new temporary folder), e.g. $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
sections=${*:-tests kernels decode}
LOG=${CITER_GPU_LOG_DIR:-$(mktemp -d)}
mkdir -p "$LOG"

if ! $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check.sh needs a CUDA GPU: $PY cannot import torch, or torch sees no CUDA device. Nothing was run."
    echo "Without a GPU: 'make test' runs every kernel under the Triton interpreter, and"
    echo "'python benchmarks/kernel_bench.py --compile-only' compiles them for sm_90 (registers, spills)."
    exit 1
fi
echo "=== versions ($(date -u +%FT%TZ))"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__, 'gpu', torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"
$PY -c "import citer._C, citer.engine" 2>/dev/null || $PY -m pip install -q --no-build-isolation --no-deps -e . || exit 1

PYTEST="$PY -m pytest -q -p no:cacheprovider --durations=5"
KG=tests/test_kernels_gpu.py
GG=tests/test_cuda_graph_gpu.py
QUICK_KERNELS=("$KG::test_paged_attention_real_sizes[q_lens0-ctx0-12-2-dtype1]"   # decode, split-KV, bf16
               "$KG::test_paged_attention_real_sizes[q_lens1-ctx1-12-2-dtype1]"   # varlen prefill, bf16
               "$KG::test_paged_attention_fp32_is_exact"                          # short catch-up, split-KV
               "$KG::test_rms_norm_and_kv_store_real_sizes[dtype1]"
               "$KG::test_routed_head_real_sizes[1]" "$KG::test_routed_head_real_sizes[40]"
               "$KG::test_routed_head_fp32_matches_reference_exactly" "$KG::test_routed_head_sampling_on_gpu"
               "$KG::test_decode_step_kernels_capture_in_a_cuda_graph"
               "tests/test_kernels.py::test_linear_int8_triton[1-200-300-None-dtype2]")  # int8 weights, bf16, split K
QUICK_GRAPHS=("$GG::test_enforce_eager_turns_graphs_off" "$GG::test_graph_replay_equals_eager[random]"
              "$GG::test_graph_replay_equals_eager[router]" "$GG::test_speculative_under_graphs_is_the_llm")

status=0
part() {  # part NAME TIMEOUT_S COMMAND...: run under a timeout, log, record rc and seconds
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s, $(date -u +%H:%M:%S))"
    local t0=$SECONDS
    PYTHONUNBUFFERED=1 timeout -k 10 "$limit" "$@" 2>&1 | tee "$LOG/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "$name $rc $((SECONDS - t0)) $limit" >> "$LOG/parts"
    [ "$rc" = 0 ] || status=1
}

if [ "$sections" = quick ]; then
    : > "$LOG/parts"
    part kernels 90 $PYTEST "${QUICK_KERNELS[@]}"
    part graphs 80 $PYTEST "${QUICK_GRAPHS[@]}"
    part parity 50 $PYTEST "$KG::test_engine_on_cuda_matches_transformers"
    part headline 160 $PY benchmarks/decode_gpu.py --batches 1 --steps 32 --repeats 3 --modes graphs \
        --max-graph-query-len 8 --json "$LOG/headline.json"
    $PY benchmarks/gpu_summary.py "$LOG"
    exit $status
fi
for s in $sections; do
    case $s in
        tests) part tests 600 $PYTEST --durations=15 $KG $GG tests/test_kernels.py tests/test_engine_triton.py \
                   tests/test_cuda_graph.py tests/test_models_gpu.py ;;
        kernels) part kernels 600 $PY benchmarks/kernel_bench.py ;;
        decode) part decode 600 $PY benchmarks/decode_gpu.py --json "$LOG/decode.json" ;;
        compare) part compare 600 $PY benchmarks/compare_policies.py --shapes gpu -n 500 --replay-n 24 \
                     --out "$LOG/compare" ;;
        compare7b) part compare7b 600 $PY benchmarks/compare_policies.py --shapes gpu7b -n 200 --replay-n 12 \
                       --assisted-n 0 --out "$LOG/compare7b" ;;
        costmodel) part costmodel 600 bash -c "$PY benchmarks/cost_calibrate.py --shape qwen2-0.5b \
                       --json $LOG/cost_0.5b.json && $PY benchmarks/cost_calibrate.py --shape qwen2-1.5b \
                       --json $LOG/cost_1.5b.json" ;;
        *) echo "unknown section $s (quick, or any of: tests kernels decode compare compare7b costmodel)"; status=1 ;;
    esac
done
exit $status
