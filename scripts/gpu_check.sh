#!/usr/bin/env bash
# The GPU session's one command:  bash scripts/gpu_check.sh
#   1. the test suite on the GPU (kernels compiled, not interpreted), cut at a time limit;
#   2. python -m bench.gpu in the time left (it skips what would not fit, and records it),
#      keeping GPU_CHECK_TORCH_S seconds (60) for
#   3. the torch backend on CUDA against the uncompiled eager code (bench.gpu --backend torch
#      --quick --providers ours,eager), into ${OUT}/torch-backend/.
# At most GPU_CHECK_TOTAL_S seconds in all (480 = 8 min); installs nothing. Logs, the pytest
# report and gpu-<device>.json/.md go to ${OUT:-bench/results}. Prints a short table last.
# The tests run GPU-related files first (those naming cuda), so that a cut loses the others;
# two CPU-only files are left out: test_bench_kernels.py (static SASS checks for three
# architectures, 15+ min) and test_bench_gpu.py (the CPU rehearsal of bench.gpu, which runs
# for real next).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-bench/results}"
PY="${PYTHON:-python}"
TOTAL_S="${GPU_CHECK_TOTAL_S:-480}"
TEST_S="${GPU_CHECK_TEST_S:-150}"
TORCH_S="${GPU_CHECK_TORCH_S:-60}"
mkdir -p "$OUT_DIR"
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device for '$PY' (torch.cuda.is_available() is False): nothing to check here" >&2
  exit 2
fi

skip=(tests/test_bench_kernels.py tests/test_bench_gpu.py)
gpu_first=() rest=()
for f in tests/test_*.py; do
  [[ " ${skip[*]} " == *" $f "* ]] && continue
  if grep -qi cuda "$f"; then gpu_first+=("$f"); else rest+=("$f"); fi
done
echo "== gpu_check: pytest (limit ${TEST_S} s): ${#gpu_first[@]} GPU files first, then ${#rest[@]} others =="
# SIGINT at the limit: pytest stops and still prints its summary of what ran.
timeout -s INT -k 20 "$TEST_S" "$PY" -m pytest -q -p no:cacheprovider --junitxml="$OUT_DIR/gpu_check-pytest.xml" \
  ${gpu_first[@]+"${gpu_first[@]}"} ${rest[@]+"${rest[@]}"} 2>&1 | tee "$OUT_DIR/gpu_check-pytest.log"
test_rc=${PIPESTATUS[0]}
test_line=$(grep -E "[0-9]+ (passed|failed|error)|no tests ran" "$OUT_DIR/gpu_check-pytest.log" | tail -n 1)
[ "$test_rc" -eq 124 ] && test_line="$test_line (cut at ${TEST_S} s)"

left=$((TOTAL_S - SECONDS))
budget=$((left - 40 - TORCH_S))  # margin: start-up, the last problem's overrun, writing the files
[ "$budget" -gt 330 ] && budget=330
echo "== gpu_check: python -m bench.gpu --budget ${budget} (hard limit $((left - 5)) s) =="
if [ "$budget" -ge 30 ]; then
  timeout -k 5 $((left - 5)) "$PY" -m bench.gpu --budget "$budget" --out "$OUT_DIR" 2>&1 \
    | tee "$OUT_DIR/gpu_check-bench.log"
  bench_rc=${PIPESTATUS[0]}
else
  bench_rc="skipped (${left} s left)"
fi

left=$((TOTAL_S - SECONDS))
torch_budget=$((left - 20))
echo "== gpu_check: python -m bench.gpu --backend torch --quick --providers ours,eager --budget ${torch_budget} =="
if [ "$torch_budget" -ge 20 ]; then
  timeout -k 5 $((left - 5)) "$PY" -m bench.gpu --backend torch --quick --providers ours,eager \
    --budget "$torch_budget" --out "$OUT_DIR/torch-backend" 2>&1 | tee "$OUT_DIR/gpu_check-torch-backend.log"
  torch_rc=${PIPESTATUS[0]}
else
  torch_rc="skipped (${left} s left)"
fi

echo
echo "== gpu_check: pytest rc ${test_rc}: ${test_line:-no summary line}; bench.gpu rc ${bench_rc}; torch backend rc ${torch_rc}; ${SECONDS} s; logs in ${OUT_DIR} =="
json=$(find "$OUT_DIR" -maxdepth 1 -name 'gpu-*.json' -newer "$OUT_DIR/gpu_check-pytest.log" | head -n 1)
[ -n "$json" ] && "$PY" -m bench.gpu --show "$json"  # this run's table, even if bench.gpu was cut
[ "$test_rc" -eq 0 ] && [ "$bench_rc" = 0 ]
