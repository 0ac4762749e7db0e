#!/usr/bin/env bash
# Compile the Triton kernels for sm_90/sm_80/sm_89 with another triton release, in its own venv
# (.venv-triton-VERSION: torch, that triton, pytest; about 1.6 GB, created on first use), and run
# the static checks of tests/test_bench_kernels.py with it: compilers differ between releases
# (register allocation, spills). No GPU needed. Extra arguments go to pytest, e.g. `-m full_compile`
# for every plan variant (hours). Usage: scripts/compile_check.sh TRITON_VERSION [--install-only | PYTEST_ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:?usage: scripts/compile_check.sh TRITON_VERSION (e.g. 3.6.0) [--install-only | PYTEST_ARGS...]}"
shift
venv=".venv-triton-$version"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
if ! "$venv/bin/python" -c "import torch, triton, einops, numpy, pytest, hypothesis" 2>/dev/null; then
  echo "== installing into $venv: torch 2.13.0 (CPU build), triton $version, pytest, hypothesis, numpy, einops"
  "$venv/bin/pip" install -q "torch==2.13.0" "triton==$version" pytest hypothesis numpy einops
fi
[ "${1:-}" = "--install-only" ] && exit 0
echo "== static compile checks with triton $("$venv/bin/python" -c 'import triton; print(triton.__version__)')"
PYTHONPATH=. TRITON_INTERPRET=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_bench_kernels.py "$@"
