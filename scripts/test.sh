#!/usr/bin/env bash
# Set up (idempotent) and run the test suite. The kernels run compiled where CUDA is available
# and under the Triton interpreter elsewhere (tests/conftest.py decides and says which), and
# tests/test_bench_kernels.py compiles a representative subset of them for sm_90/sm_80/sm_89
# with the installed triton (all of them: `bash scripts/test.sh -m full_compile
# tests/test_bench_kernels.py`, hours). The same compile checks with another triton release:
# scripts/compile_check.sh; other torch releases: scripts/version_matrix.sh (CI runs all three).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. .venv/bin/activate
if [ $# -eq 0 ]; then
  ruff check .  # lint and import order (pyproject.toml [tool.ruff])
fi
python -m pytest -q --durations=15 "$@"
