#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite; kernels run under the Triton interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
if [ $# -eq 0 ]; then
  # The whole suite also compiles the kernels with the GPU machine's triton (3.6).
  bash scripts/compile_check.sh 3.6.0
fi
. .venv/bin/activate
TRITON_INTERPRET=1 python -m pytest -q "$@"
