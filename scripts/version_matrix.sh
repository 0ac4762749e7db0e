#!/usr/bin/env bash
# The torch-path tests (API, autograd, numerics, the torch backend against the reference, the
# fullgraph trace of every device decision, torch.compile) on other torch releases than .venv's,
# each in its own venv (.venv-torch-VERSION: torch, numpy, einops, pytest, hypothesis, setuptools
# for inductor's C++ builds, and no triton, so the runs also check that the package works without
# it). PyPI serves these releases only as CUDA builds (~4.5 GB installed each, with the nvidia-*
# libraries that `import torch` loads; they run on the CPU); uv installs one in about a minute
# where pip takes several, and ignores this machine's pip cap at torch 2.14.1.
# Usage: scripts/version_matrix.sh [install|test|all] [VERSION...]  (default: all, the versions below)
set -euo pipefail
cd "$(dirname "$0")/.."
# The oldest release the package supports (pyproject.toml), the one the GPU notes were taken
# with, and the newest on PyPI; .venv has 2.13.0. Older releases pass the eager tests but fail
# under torch.compile: 2.4 and 2.5 cannot trace the ops' autograd.Function; 2.6 and 2.8 (2.7
# untried) drop the in-graph finite check (torch._assert_async); 2.6 cannot trace torch.device(d).
DEFAULT_VERSIONS=(2.9.1 2.11.0 2.15.0)
UV_VERSION=0.13.9
TORCH_PATH_TESTS=(
  tests/test_api_degenerate.py tests/test_api_errors.py tests/test_api_invariants.py tests/test_api_numerics.py
  tests/test_api_views.py tests/test_autograd.py tests/test_torch_impl.py tests/test_torch_impl_memory.py
  tests/test_validation.py tests/test_nn.py tests/test_trace_device_decisions.py tests/test_blas_ties.py
)

phase="${1:-all}"
[ $# -gt 0 ] && shift
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=("${DEFAULT_VERSIONS[@]}")

uv=.venv-uv/bin/uv
install_one() {
  local v="$1" venv=".venv-torch-$1"
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import torch, numpy, einops, pytest, hypothesis, setuptools, sys
sys.exit(torch.__version__.split('+')[0] != '$v')" 2>/dev/null; then
    return
  fi
  if [ ! -x "$uv" ]; then
    python3 -m venv .venv-uv
    .venv-uv/bin/pip install -q "uv==$UV_VERSION"
  fi
  echo "== installing torch $v (CUDA build, runs on CPU), numpy, einops, pytest, hypothesis into $venv"
  rm -rf "$venv"
  "$uv" venv -q --python "$(command -v python3)" "$venv"
  local no_triton
  no_triton=$(mktemp)
  echo 'triton ; sys_platform == "never"' > "$no_triton"  # torch's CUDA builds pull triton: leave it out
  VIRTUAL_ENV="$PWD/$venv" "$uv" pip install -q --override "$no_triton" "torch==$v" numpy einops pytest hypothesis setuptools
  rm -f "$no_triton"
}

test_one() {
  local v="$1" venv=".venv-torch-$1"
  echo "== torch-path tests with torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)'), without triton"
  "$venv/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('triton') is not None)" ||
    { echo "$venv has triton installed: these runs must show that the package works without it" >&2; return 1; }
  # -k 'not triton': the tests that run the triton backend need triton.
  PYTHONPATH=. "$venv/bin/python" -m pytest -q -p no:cacheprovider -k "not triton" "${TORCH_PATH_TESTS[@]}"
}

for v in "${versions[@]}"; do
  case "$phase" in
    install) install_one "$v" ;;
    test) test_one "$v" ;;
    all) install_one "$v"; test_one "$v" ;;
    *) echo "usage: scripts/version_matrix.sh [install|test|all] [VERSION...]" >&2; exit 2 ;;
  esac
done
