#!/usr/bin/env bash
# Sets up .venv (scripts/install.sh dev), lints, runs every benchmark once untimed (so none rots),
# compiles the GPU code for sm_80/sm_90 without a GPU (scripts/compile_check.sh), then the test suite.
# Without a GPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by
# tests/conftest.py and bench/conftest.py) and CUDA tests skip.
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh tests/test_x.py # lint, then only these tests (pytest's arguments)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
.venv/bin/ruff check .
if [ $# -eq 0 ]; then
    .venv/bin/python -m pytest -q -p no:cacheprovider bench --benchmark-disable
    # sm_80/sm_90 without a GPU: csrc/ (nvcc, torch 2.14.1), Triton 3.6 and 3.8; it needs nvcc
    if command -v nvcc >/dev/null || [ -n "${CUDA_HOME:-}" ]; then
        bash scripts/compile_check.sh
    else
        echo "test.sh: no nvcc on PATH and no CUDA_HOME: scripts/compile_check.sh skipped" >&2
    fi
fi
exec .venv/bin/python -m pytest -q "$@"
