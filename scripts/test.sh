#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite; kernels run under the Triton interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. .venv/bin/activate
TRITON_INTERPRET=1 python -m pytest -q "$@"
