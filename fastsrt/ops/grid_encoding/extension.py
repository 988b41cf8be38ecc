"""The grid encoding through fastsrt's C++/CUDA extension: the autograd Function over it, and its
loader, which builds it at first use (cached) and loads it.

The sources are the repository's top-level ``csrc/``; a wheel carries them as ``fastsrt/csrc/``
(setup.py maps them in), so the loader looks there first and then beside the package (a checkout
or an editable install). The build goes to ``$TORCH_EXTENSIONS_DIR`` or
``~/.cache/fastsrt/extensions``, in a folder named by a hash of the sources, the compiler flags,
torch, Python and, for a CUDA build, the toolkit and the GPU architectures compiled for, so it is
compiled once and reused by later processes; the compiler's whole output is kept beside it as
``build.log`` (``-Xptxas -v``: registers and spills per kernel). The library is loaded only while
it matches the digest recorded after its build (``fastsrt.integrity``), and a truncated or altered
one is removed and built again first.

CUDA kernels are compiled in wherever they can be, GPU or not: torch has CUDA, ``CUDA_HOME`` (torch's
guess from the nvcc on PATH, or the variable) is a toolkit root, and the target architectures are
known ($TORCH_CUDA_ARCH_LIST, else the visible GPUs); ``why_no_cuda`` says which is missing. Where
the extension cannot be built at all (no compiler, no sources, a failed build) or
``FASTSRT_NO_EXTENSION=1`` is set, ``why_unavailable`` says why and the grid encoding's dispatch
uses the torch reference. ``fastsrt build-extension`` builds ahead of time (container images).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch
from torch.autograd.function import once_differentiable

from fastsrt.errors import Unavailable
from fastsrt.integrity import record_digest, record_path, why_not_intact
from fastsrt.ops.grid_encoding.reference import GridEncodingConfig

SOURCES = ("grid_encoding.h", "grid_encoding.cpp", "grid_encoding_cuda.cu")
CXX_FLAGS = ("-O3", "-fopenmp", "-Wall", "-Wextra")
# -Xptxas -v: ptxas reports registers, stack and spills per kernel into the build log
NVCC_FLAGS = ("-O3", "-Xptxas", "-v", "-Xcompiler", "-Wall,-Wextra")
LOG_NAME = "build.log"


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


def cuda_architectures() -> str:
    """The GPU architectures a CUDA build compiles for, by torch's rule: $TORCH_CUDA_ARCH_LIST, else
    the compute capabilities of the visible GPUs ("" where there are neither)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip():
        return os.environ["TORCH_CUDA_ARCH_LIST"].strip()
    capabilities = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return ";".join(f"{major}.{minor}" for major, minor in sorted(capabilities))


def nvcc_toolkit_root() -> str | None:
    """The root of the CUDA toolkit that the ``nvcc`` on PATH belongs to, as nvcc itself reports it
    (``TOP`` in its dry run), or None without nvcc. Where ``nvcc`` is a wrapper script (say
    /usr/local/bin/nvcc running /usr/local/cuda-13.0/bin/nvcc), this is the real toolkit, whereas
    torch's guess, the parent of nvcc's folder, is /usr/local."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:  # the dry run only prints the steps; the source file need not exist
        done = subprocess.run([nvcc, "-dryrun", "-c", "fastsrt_probe.cu", "-o", os.devnull],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", done.stdout + done.stderr, re.MULTILINE)
    return os.path.realpath(match[1].strip()) if match else None


def why_no_cuda() -> str:
    """Why the extension's CUDA kernels cannot be compiled here ("" where they can): a CPU-only
    torch, no nvcc, a CUDA_HOME that is not a toolkit root, or no target architecture."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return "nvcc was not found: install the CUDA toolkit and put its bin/ on PATH or set CUDA_HOME to its root"
    if not (Path(CUDA_HOME, "bin", "nvcc").is_file() and Path(CUDA_HOME, "include", "cuda_runtime.h").is_file()):
        root = nvcc_toolkit_root()
        advice = (f"the nvcc on PATH belongs to {root}: set CUDA_HOME={root}" if root and root != CUDA_HOME
                  else "set CUDA_HOME to the toolkit's root")
        return f"CUDA_HOME={CUDA_HOME} is not a CUDA toolkit root (no bin/nvcc and include/cuda_runtime.h); {advice}"
    if not cuda_architectures():
        return ('no GPU is visible and TORCH_CUDA_ARCH_LIST is not set: name the GPU architectures to compile for, '
                'e.g. TORCH_CUDA_ARCH_LIST="8.0;9.0"')
    return ""


def build_key(with_cuda: bool) -> str:
    """The build folder's hash: the sources, the compiler flags, torch, CUDA, Python and, for a
    CUDA build, the toolkit and the GPU architectures (a build for one GPU generation cannot run
    on another)."""
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((source_folder() / name).read_bytes())
    digest.update(f"{torch.__version__} {torch.version.cuda} {sys.version_info[:2]} {with_cuda}".encode())
    digest.update(" ".join(CXX_FLAGS).encode())
    if with_cuda:
        from torch.utils.cpp_extension import CUDA_HOME

        digest.update(f" {' '.join(NVCC_FLAGS)} toolkit {CUDA_HOME} arch {cuda_architectures()}".encode())
    return digest.hexdigest()[:16]


def build_folder(with_cuda: bool) -> Path:
    """The folder the library of this configuration is built in (and its ``build.log``)."""
    return _cache_root() / f"{_name(with_cuda)}_{build_key(with_cuda)}"


def _name(with_cuda: bool) -> str:
    return f"fastsrt_grid_encoding_{'cuda' if with_cuda else 'cpu'}"


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


@contextlib.contextmanager
def _output_to(log: Path):
    """This process's stdout and stderr (file descriptors 1 and 2, which the compiler processes
    inherit) go to ``log`` while the build runs: torch prints the compiler's output there only
    in verbose mode, and hides it otherwise even where the build succeeds."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(log, "w") as handle:
            os.dup2(handle.fileno(), 1)
            os.dup2(handle.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for descriptor in saved:
            os.close(descriptor)


def _failure(error: Exception, log: Path) -> str:
    """The reason a build failed: the compiler's first error line where the log has one."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    errors = [line.strip() for line in text.splitlines() if re.search(r"\berror\b", line, re.IGNORECASE)]
    lines = [line for line in str(error).splitlines() if line.strip()]
    first = errors[0] if errors else (lines[-1] if lines else type(error).__name__)
    return f"build failed: {first[:300]}" + (f" (the compiler's output: {log})" if text else "")


@functools.cache
def build_extension() -> tuple[ModuleType | None, str]:
    """(the compiled extension module, "") or (None, why it cannot be built here); it is built at
    the first call of a process (reusing an earlier process's build) and never retried. The CUDA
    kernels are in it where ``why_no_cuda()`` is empty (``module.has_cuda()``)."""
    folder = source_folder()
    missing = [name for name in SOURCES if not (folder / name).is_file()]
    if missing:
        return None, f"sources not found in {folder}: {', '.join(missing)}; reinstall fastsrt"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return None, f"no C++ compiler {compiler!r} on PATH"

    from torch.utils import cpp_extension

    with_cuda = not why_no_cuda()
    sources = [folder / "grid_encoding.cpp"] + ([folder / "grid_encoding_cuda.cu"] if with_cuda else [])
    name = _name(with_cuda)
    build_dir = build_folder(with_cuda)
    library = build_dir / f"{name}.so"
    log = build_dir / LOG_NAME
    try:
        with _exclusive(build_dir):  # one process at a time checks, builds, loads and records this build
            damage = why_not_intact(library)
            if library.exists() and damage:  # never load a damaged library: ninja relinks it
                print(f"fastsrt: the compiled extension {library} {damage}: building it again", file=sys.stderr,
                      flush=True)
                library.unlink()
                record_path(library).unlink(missing_ok=True)
            building = not library.exists()
            if building:
                what = f"C++/CUDA (for {cuda_architectures()})" if with_cuda else "C++"
                print(f"fastsrt: building the {what} grid-encoding extension once (about a minute) in {build_dir}",
                      file=sys.stderr, flush=True)
            with _output_to(log) if building else contextlib.nullcontext():
                module = cpp_extension.load(
                    name=name,
                    sources=[str(s) for s in sources],
                    build_directory=str(build_dir),
                    extra_cflags=[*CXX_FLAGS, *(["-DWITH_CUDA"] if with_cuda else [])],
                    extra_ldflags=["-fopenmp"],
                    extra_cuda_cflags=list(NVCC_FLAGS),
                    verbose=building,
                )
            if why_not_intact(library):  # built in this call
                record_digest(library)
    except Exception as error:  # a failed build of any kind, or an unwritable build folder, leaves the torch encoding
        return None, _failure(error, log)
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
