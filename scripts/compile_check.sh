#!/usr/bin/env bash
# Compiles fastsrt's GPU code for sm_80 and sm_90 without a GPU, as CI does, and fails on a compiler
# error, a warning in csrc/ or a register spill; prints registers and spills per kernel:
#  - csrc/grid_encoding_cuda.cu with nvcc (-Xptxas -v) against the CUDA 13.0 build of torch 2.14.1
#    (scripts/check_cuda_extension.py, through fastsrt's own loader);
#  - every Triton kernel under Triton 3.6.0 (alone) and torch 2.14.1's Triton 3.8, and under the
#    Triton of each PYTHON given (scripts/check_triton_kernels.py; the test suite runs it for .venv's).
# The two extra environments (torch 2.14.1 with its CUDA libraries: ~5.5 GB; triton 3.6.0: ~0.7 GB)
# are made once in ${XDG_CACHE_HOME:-~/.cache}/fastsrt/ci and reused while they import; a broken
# one is made again. Needs nvcc (CUDA 13) on PATH or CUDA_HOME, and the package registry the first time.
#   bash scripts/compile_check.sh [PYTHON...]
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${XDG_CACHE_HOME:-$HOME/.cache}/fastsrt/ci
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9  # one run at a time makes or uses the environments
SECONDS=0

cached_venv() {  # NAME CHECK PACKAGE...: $cache/NAME with PACKAGEs, made again unless its CHECK (Python) passes
    local venv=$cache/$1 check=$2
    shift 2
    if [ -f "$venv/.complete" ] && "$venv/bin/python" -c "$check" >/dev/null 2>&1; then
        return
    fi
    echo "compile_check: making $venv ($*)"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --no-cache-dir "$@"
    "$venv/bin/python" -c "$check"
    touch "$venv/.complete"
}

cached_venv triton-3.6.0 "import triton, numpy; assert triton.__version__ == '3.6.0'" triton==3.6.0 numpy
cached_venv torch-2.14.1 "import torch, triton, ninja, numpy, torch.utils.cpp_extension; \
assert torch.__version__.startswith('2.14.1') and torch.version.cuda" torch==2.14.1 ninja numpy setuptools
echo "compile_check: environments ready after ${SECONDS} s"

# torch guesses CUDA_HOME as the parent of nvcc's folder: wrong for a wrapper script such as
# /usr/local/bin/nvcc; nvcc's own dry run names its toolkit (TOP)
if [ -z "${CUDA_HOME:-}" ]; then
    top=$(nvcc -dryrun -c fastsrt_probe.cu -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p')
    [ -n "$top" ] || { echo "compile_check: no nvcc on PATH and CUDA_HOME is not set" >&2; exit 1; }
    export CUDA_HOME=$(realpath "$top")
fi
status=0
PATH="$cache/torch-2.14.1/bin:$PATH" "$cache/torch-2.14.1/bin/python" scripts/check_cuda_extension.py \
    --arch "8.0;9.0" || status=1
echo "compile_check: CUDA extension checked after ${SECONDS} s"
for python in "$cache/triton-3.6.0/bin/python" "$cache/torch-2.14.1/bin/python" "$@"; do
    "$python" scripts/check_triton_kernels.py --arch 80 90 || status=1
done
echo "compile_check: done in ${SECONDS} s ($([ $status = 0 ] && echo passed || echo FAILED))"
exit $status
