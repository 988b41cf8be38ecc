"""Builds (at first use, cached) and loads fastsrt's C++/CUDA grid-encoding extension.

The sources live in ``fastsrt/csrc/`` and ship with the package (package data: every install,
editable or from a wheel, has them). The build goes to ``$TORCH_EXTENSIONS_DIR`` or
``~/.cache/fastsrt/extensions``, in a folder named by a hash of the sources, torch, Python and the
GPU architectures compiled for, so it is compiled once and reused by later processes.
CUDA kernels are compiled in where torch has CUDA, a GPU is visible and nvcc is found. Where the
extension cannot be built (no compiler, no sources, a failed build, or ``FASTSRT_NO_EXTENSION=1``)
``load_extension`` warns once and returns None, and callers use the torch encoding.
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

CSRC = Path(__file__).resolve().parents[1] / "csrc"
SOURCES = ("grid_encoding.h", "grid_encoding.cpp", "grid_encoding_cuda.cu")


def _cache_root() -> Path:
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastsrt" / "extensions"


def _with_cuda() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and torch.cuda.is_available() and CUDA_HOME is not None


def cuda_architectures() -> str:
    """The GPU architectures a CUDA build compiles for, by torch's rule: $TORCH_CUDA_ARCH_LIST, else
    the compute capabilities of the visible GPUs."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    capabilities = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return ";".join(f"{major}.{minor}" for major, minor in sorted(capabilities))


def build_key(with_cuda: bool) -> str:
    """The build folder's hash: the sources, torch, CUDA, Python and, for a CUDA build, the GPU
    architectures (a build for one GPU generation cannot run on another)."""
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((CSRC / name).read_bytes())
    digest.update(f"{torch.__version__} {torch.version.cuda} {sys.version_info[:2]} {with_cuda}".encode())
    if with_cuda:
        digest.update(f" arch {cuda_architectures()}".encode())
    return digest.hexdigest()[:16]


def _unavailable(reason: str) -> None:
    warnings.warn(f"the C++ grid-encoding extension is unavailable ({reason}); using the torch encoding (slower)", stacklevel=3)


@functools.cache
def load_extension() -> ModuleType | None:
    """The compiled extension module, building it on first use; None (with one warning) where
    it cannot be built."""
    if os.environ.get("FASTSRT_NO_EXTENSION", "") not in ("", "0"):
        _unavailable("FASTSRT_NO_EXTENSION is set")
        return None
    missing = [name for name in SOURCES if not (CSRC / name).is_file()]
    if missing:
        _unavailable(f"sources not found in {CSRC}: {', '.join(missing)}; reinstall fastsrt")
        return None
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        _unavailable(f"no C++ compiler {compiler!r} on PATH")
        return None

    from torch.utils import cpp_extension

    with_cuda = _with_cuda()
    sources = [CSRC / "grid_encoding.cpp"] + ([CSRC / "grid_encoding_cuda.cu"] if with_cuda else [])
    name = f"fastsrt_grid_encoding_{'cuda' if with_cuda else 'cpu'}"
    build_dir = _cache_root() / f"{name}_{build_key(with_cuda)}"
    if not any(build_dir.glob("*.so")):
        what = "C++/CUDA" if with_cuda else "C++"
        print(f"fastsrt: building the {what} grid-encoding extension once (about a minute) in {build_dir}", file=sys.stderr, flush=True)
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        return cpp_extension.load(
            name=name,
            sources=[str(s) for s in sources],
            build_directory=str(build_dir),
            extra_cflags=["-O3", "-fopenmp"] + (["-DWITH_CUDA"] if with_cuda else []),
            extra_ldflags=["-fopenmp"],
            extra_cuda_cflags=["-O3"],
            verbose=False,
        )
    except Exception as error:  # a failed build of any kind degrades to the torch encoding
        lines = [line for line in str(error).splitlines() if line.strip()]
        _unavailable(f"build failed: {lines[-1][:200] if lines else type(error).__name__}")
        return None
