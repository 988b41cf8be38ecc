#!/usr/bin/env bash
# Sets up .venv (scripts/install.sh dev) and runs the test suite. Without a GPU the Triton kernels
# run in Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py) and CUDA tests skip.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
exec .venv/bin/python -m pytest -q "$@"
