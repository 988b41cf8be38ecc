#!/usr/bin/env bash
# The GPU proof in one command (bench/gpu_check.py): the environment, the extension built for the
# visible GPU, every CUDA and Triton test, the benchmark rows of the targets, bench/results/*-<gpu>.*,
# and the targets met / missed / not measured as the last lines; within 9 minutes on an H100/H200.
# Needs no network and no install: fastsrt and bench come from this checkout (PYTHONPATH).
#   bash scripts/gpu_check.sh [OUT] [--steps a,b] [--cpu]   # OUT (default gpu_check_out): gpu_check.log,
#                                                           # summary.md, gpu_check-<gpu>.tar.gz
#   FASTSRT_GPU_CHECK=cpu bash scripts/gpu_check.sh OUT     # the CPU run (CI): tiny shapes, the same steps
# Python: $PYTHON, else python3. Exit status 1 when a test failed or a step crashed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=gpu_check_out
skip_value=0
for arg in "$@"; do  # OUT: the first argument that is neither an option nor an option's value
    if [ $skip_value = 1 ]; then skip_value=0; continue; fi
    case "$arg" in
        --steps|--results|--deadline) skip_value=1 ;;
        -*) ;;
        *) out="$arg"; break ;;
    esac
done
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# torch's extension builder takes CUDA_HOME, else two folders above the nvcc on PATH: wrong where that
# nvcc is a wrapper outside the toolkit, so point it at the toolkit that holds the real nvcc
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
    toolkit="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
    [ -f "$toolkit/include/cuda_runtime.h" ] || toolkit=/usr/local/cuda
    [ -f "$toolkit/include/cuda_runtime.h" ] && export CUDA_HOME="$toolkit"
fi
echo "gpu_check: CUDA_HOME=${CUDA_HOME:-unset} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-unset}" | tee "$out/gpu_check.log"
# the backstop: the script keeps its own deadline (525 s), this ends it should that ever hang
timeout -k 10 570 "${PYTHON:-python3}" -m bench.gpu_check "$@" 2>&1 | tee -a "$out/gpu_check.log"
