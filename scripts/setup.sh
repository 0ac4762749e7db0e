#!/usr/bin/env bash
# Create .venv (if needed) and install the project with the given extras, e.g. `test`, `demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
# torch is installed first and pinned: on this project's machines pip's configuration serves
# torch 2.13.0 as a CPU build (seconds), whereas an unpinned `pip install torch` would pull a
# multi-GB CUDA build. Elsewhere, install the torch build you want into .venv before this.
python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0"
extras=$(IFS=,; echo "$*")
pip install -q -e ".${extras:+[$extras]}"
