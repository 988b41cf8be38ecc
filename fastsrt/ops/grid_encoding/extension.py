"""The grid encoding through fastsrt's C++/CUDA extension: the autograd Function over it, and its
loader, which builds it at first use (cached) and loads it.

The sources are the repository's top-level ``csrc/``; a wheel carries them as ``fastsrt/csrc/``
(setup.py maps them in), so the loader looks there first and then beside the package (a checkout
or an editable install). The build goes to ``$TORCH_EXTENSIONS_DIR`` or
``~/.cache/fastsrt/extensions``, in a folder named by a hash of the sources, torch, Python and the
GPU architectures compiled for, so it is compiled once and reused by later processes; the
library is loaded only while it matches the digest recorded after its build (``fastsrt.integrity``),
and a truncated or altered one is removed and built again first. CUDA kernels
are compiled in where torch has CUDA, a GPU is visible and nvcc is found. Where it cannot be built
(no compiler, no sources, a failed build) or ``FASTSRT_NO_EXTENSION=1`` is set, ``why_unavailable``
says why and the grid encoding's dispatch uses the torch reference.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

import torch
from torch.autograd.function import once_differentiable

from fastsrt.errors import Unavailable
from fastsrt.integrity import record_digest, record_path, why_not_intact
from fastsrt.ops.grid_encoding.reference import GridEncodingConfig

SOURCES = ("grid_encoding.h", "grid_encoding.cpp", "grid_encoding_cuda.cu")


def source_folder() -> Path:
    """Where the C++/CUDA sources are: ``fastsrt/csrc`` in an installed wheel, else the top-level
    ``csrc/`` beside the package (a checkout, an editable install)."""
    package = Path(__file__).resolve().parents[2]
    installed = package / "csrc"
    return installed if installed.is_dir() else package.parent / "csrc"


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
        digest.update((source_folder() / name).read_bytes())
    digest.update(f"{torch.__version__} {torch.version.cuda} {sys.version_info[:2]} {with_cuda}".encode())
    if with_cuda:
        digest.update(f" arch {cuda_architectures()}".encode())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _exclusive(folder: Path):
    """Holds an exclusive lock on a build folder, released when the process ends however it ends
    (flock). Where there is no flock, torch's own lock still serialises the build itself."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(folder / "fastsrt.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


@functools.cache
def build_extension() -> tuple[ModuleType | None, str]:
    """(the compiled extension module, "") or (None, why it cannot be built here); it is built at
    the first call of a process (reusing an earlier process's build) and never retried."""
    folder = source_folder()
    missing = [name for name in SOURCES if not (folder / name).is_file()]
    if missing:
        return None, f"sources not found in {folder}: {', '.join(missing)}; reinstall fastsrt"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return None, f"no C++ compiler {compiler!r} on PATH"

    from torch.utils import cpp_extension

    with_cuda = _with_cuda()
    sources = [folder / "grid_encoding.cpp"] + ([folder / "grid_encoding_cuda.cu"] if with_cuda else [])
    name = f"fastsrt_grid_encoding_{'cuda' if with_cuda else 'cpu'}"
    build_dir = _cache_root() / f"{name}_{build_key(with_cuda)}"
    library = build_dir / f"{name}.so"
    try:
        with _exclusive(build_dir):  # one process at a time checks, builds, loads and records this build
            damage = why_not_intact(library)
            if library.exists() and damage:  # never load a damaged library: ninja relinks it
                print(f"fastsrt: the compiled extension {library} {damage}: building it again", file=sys.stderr,
                      flush=True)
                library.unlink()
                record_path(library).unlink(missing_ok=True)
            elif not library.exists():
                what = "C++/CUDA" if with_cuda else "C++"
                print(f"fastsrt: building the {what} grid-encoding extension once (about a minute) in {build_dir}",
                      file=sys.stderr, flush=True)
            module = cpp_extension.load(
                name=name,
                sources=[str(s) for s in sources],
                build_directory=str(build_dir),
                extra_cflags=["-O3", "-fopenmp"] + (["-DWITH_CUDA"] if with_cuda else []),
                extra_ldflags=["-fopenmp"],
                extra_cuda_cflags=["-O3"],
                verbose=False,
            )
            if why_not_intact(library):  # built (or rebuilt by ninja for changed flags) in this call
                record_digest(library)
    except Exception as error:  # a failed build of any kind, or an unwritable build folder, leaves the torch encoding
        lines = [line for line in str(error).splitlines() if line.strip()]
        return None, f"build failed: {lines[-1][:200] if lines else type(error).__name__}"
    return module, ""


def why_unavailable() -> str:
    """Why the extension cannot be used here ("" where it can): FASTSRT_NO_EXTENSION is set (read
    at every call), or why it cannot be built."""
    if os.environ.get("FASTSRT_NO_EXTENSION", "") not in ("", "0"):
        return "FASTSRT_NO_EXTENSION is set"
    return build_extension()[1]


def load_extension() -> ModuleType:
    """The compiled extension module, built on first use; ``Unavailable`` saying why where it
    cannot be used here."""
    reason = why_unavailable()
    if reason:
        raise Unavailable(f"the C++ grid-encoding extension is unavailable: {reason}")
    return build_extension()[0]


class _ExtensionEncoding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, coords, table, levels, extension):
        out = coords.new_empty(coords.shape[0], coords.shape[1], levels.shape[0] * table.shape[2])
        extension.forward(coords, table, levels, out)
        ctx.save_for_backward(coords, table)
        ctx.levels, ctx.extension = levels, extension
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        coords, table = ctx.saved_tensors
        grad_table = torch.zeros_like(table) if ctx.needs_input_grad[1] else None
        grad_coords = torch.empty_like(coords) if ctx.needs_input_grad[0] else None
        ctx.extension.backward(grad_out.contiguous(), coords, table, ctx.levels, grad_table, grad_coords)
        return grad_coords, grad_table, None, None


@functools.cache
def _level_table(config: GridEncodingConfig) -> torch.Tensor:
    return config.level_table()


def grid_encode_extension(coords: torch.Tensor, table: torch.Tensor, config: GridEncodingConfig) -> torch.Tensor:
    """``grid_encode_reference`` computed by the extension (float32 or float64, CPU or CUDA),
    differentiable in coords and table."""
    return _ExtensionEncoding.apply(coords.contiguous(), table.contiguous(), _level_table(config), load_extension())
