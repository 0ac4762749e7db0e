#!/usr/bin/env bash
# Compile the Triton kernels for Hopper (sm_90) with another triton release, in its own venv:
# the lent GPU machine runs triton 3.6 while development uses the newest, and their compilers
# differ (register allocation, spills). No GPU needed. Usage: scripts/compile_check.sh 3.6.0
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:?usage: scripts/compile_check.sh TRITON_VERSION}"
venv=".venv-triton-$version"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "torch==2.13.0" "triton==$version" pytest hypothesis numpy
fi
echo "== sm_90 compile check with triton $("$venv/bin/python" -c 'import triton; print(triton.__version__)')"
PYTHONPATH=. TRITON_INTERPRET=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_compile_sm90.py
