"""Compiling for GPUs without one: the extension loader's CUDA decisions (CUDA_HOME, target
architectures, the build key), `fastsrt build-extension`, and the reading of compiler output that
scripts/compile_check.sh fails on (spills, warnings), tried on real nvcc output where nvcc exists.
The full compile of csrc/ and of the Triton kernels under several Tritons is scripts/compile_check.sh
(run by scripts/test.sh); the Triton compile of this environment is in tests/test_patch_embed.py and
tests/test_warp_aggregate.py."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastsrt.cli import main
from fastsrt.compile_report import parse_ptxas_log, resources_table, warnings_in
from fastsrt.ops.grid_encoding import extension as loader

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on PATH")

# a kernel that keeps 64 values live, compiled with at most 24 registers: ptxas must spill; and one that needs few
SPILLING_SOURCE = r"""
__global__ void heavy(const float* in, float* out, int n) {
  float v[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) v[i] = in[threadIdx.x + i * n];
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < 64; ++i) s += v[i] * v[63 - i] + v[(i * 7) % 64];
  out[threadIdx.x] = s;
}
__global__ void light(float* out) { out[threadIdx.x] = 1.f; }
"""


def nvcc(tmp_path: Path, source: str, *flags: str, name: str = "kernels.cu") -> subprocess.CompletedProcess:
    (tmp_path / name).write_text(source)
    return subprocess.run(["nvcc", "-fatbin", *flags, name, "-o", "out.fatbin"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)


@needs_nvcc
def test_a_register_spill_is_read_from_real_ptxas_output(tmp_path):
    archs = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
    done = nvcc(tmp_path, SPILLING_SOURCE, *archs, "-Xptxas", "-v", "-maxrregcount", "24")
    assert done.returncode == 0, done.stderr
    kernels = parse_ptxas_log(done.stdout + done.stderr)
    assert sorted((k.name, k.arch) for k in kernels) == sorted(
        (name, arch) for name in ("_Z5heavyPKfPfi", "_Z5lightPf") for arch in ("sm_80", "sm_90"))
    for kernel in kernels:
        assert 0 < kernel.registers <= 24
        assert kernel.spills == (kernel.name == "_Z5heavyPKfPfi"), kernel
    assert "heavy(float const*, float*, int)" in resources_table(kernels)  # demangled


@needs_nvcc
def test_warnings_are_attributed_to_their_own_file(tmp_path):
    (tmp_path / "other.cuh").write_text("__device__ inline int other() { int unused_there; return 1; }\n")
    source = '#include "other.cuh"\n__global__ void k(int* out) { int unused_here; *out = other(); }\n'
    done = nvcc(tmp_path, source, "-arch=sm_90", name="own.cu")
    assert done.returncode == 0, done.stderr
    log = done.stdout + done.stderr
    assert "unused_there" in log and "unused_here" in log  # nvcc warned in both files
    own = warnings_in(log, ["own.cu"])
    assert len(own) == 1 and "unused_here" in own[0], log
    assert warnings_in(log, ["grid_encoding_cuda.cu"]) == []


def test_the_cuda_build_key_holds_the_architectures(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    both = loader.build_key(with_cuda=True)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    one = loader.build_key(with_cuda=True)
    assert len({both, one, loader.build_key(with_cuda=False)}) == 3
    assert loader.build_folder(True).name == f"fastsrt_grid_encoding_cuda_{one}"


@pytest.mark.skipif(torch.version.cuda is not None, reason="a CUDA torch")
def test_a_cpu_torch_says_why_it_has_no_cuda_kernels():
    assert loader.why_no_cuda() == f"torch {torch.__version__} is a CPU-only build"


@needs_nvcc
def test_a_cuda_home_guessed_from_an_nvcc_wrapper_is_named_with_the_real_root(tmp_path, monkeypatch):
    """The trap of these machines, rebuilt in a folder: bin/nvcc is a script that runs the real
    nvcc, so the parent of its folder (torch's guess) is no toolkit. The loader names the real
    root, as nvcc reports it."""
    from torch.utils import cpp_extension

    (tmp_path / "bin").mkdir()
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("nvcc")} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    root = loader.nvcc_toolkit_root()
    assert root and Path(root, "include", "cuda_runtime.h").is_file() and Path(root, "bin", "nvcc").is_file()

    monkeypatch.setattr(torch.version, "cuda", "13.0")  # what a CUDA torch reports; the rest is this machine's
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    reason = loader.why_no_cuda()
    assert f"CUDA_HOME={tmp_path} is not a CUDA toolkit root" in reason and f"set CUDA_HOME={root}" in reason
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", root)
    assert loader.why_no_cuda() == ""
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    if not torch.cuda.is_available():
        assert "TORCH_CUDA_ARCH_LIST is not set" in loader.why_no_cuda()


def test_build_extension_help_imports_no_torch():
    code = ("import sys\nfrom fastsrt.cli import main\ntry:\n    main(['build-extension', '--help'])\n"
            "except SystemExit:\n    pass\nprint('torch imported:', 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: fastsrt build-extension" in done.stdout and done.stdout.strip().endswith("torch imported: False")


@pytest.mark.parametrize("arch", ["8,0", "sm_90", "9.0;;x", ""])
def test_build_extension_refuses_a_bad_arch_list(arch, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["build-extension", "--arch", arch])
    assert exit_.value.code == 2 and f"{arch!r}" in capsys.readouterr().err


@pytest.mark.skipif(torch.version.cuda is not None, reason="a CUDA torch")
def test_build_extension_on_a_cpu_torch(extension, capsys):
    """Without --arch: the CPU build, its path and what it was built for. With --arch: an error
    that says why no CUDA kernels can be compiled, exit code 1."""
    assert main(["build-extension"]) == 0
    out = capsys.readouterr().out
    assert f"fastsrt build-extension: {extension.__file__}" in out and "built for: CPU only" in out
    assert main(["build-extension", "--arch", "8.0;9.0"]) == 1
    assert "CPU-only build" in capsys.readouterr().err


def test_the_cpu_build_has_no_warnings_in_fastsrt_sources(extension):
    """The C++ sources compile without a warning under -Wall -Wextra (the build log of the library
    the tests use)."""
    log = Path(extension.__file__).parent / "build.log"
    if not log.is_file():
        pytest.skip(f"{log} is missing (a library built before build logs were kept)")
    assert warnings_in(log.read_text(), list(loader.SOURCES)) == []
