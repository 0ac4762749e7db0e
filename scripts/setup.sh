#!/usr/bin/env bash
# Create .venv (if needed) and install the project with the given extras, e.g. `test`, `demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
# A CPU build of torch: an unpinned `pip install torch` would pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0"
extras=$(IFS=,; echo "$*")
pip install -q -e ".${extras:+[$extras]}"
