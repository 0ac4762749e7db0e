#!/usr/bin/env bash
# Set up (idempotent) and run the project's main job: `python -m brnpa_triton`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
. .venv/bin/activate
python -m brnpa_triton "$@"
