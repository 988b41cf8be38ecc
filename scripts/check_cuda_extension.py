"""Compiles fastsrt's C++/CUDA extension (csrc/) for GPU architectures without a GPU, through
fastsrt's own loader, into a fresh folder, and checks the compiler's output: it fails on a build
error, a warning in csrc/ (host compiler or nvcc), a ptxas warning, a register spill, or a kernel
not compiled for every architecture asked for. Prints registers and spills per kernel.

Needs a CUDA build of torch and CUDA_HOME at the toolkit root (scripts/compile_check.sh sets both up):

    CUDA_HOME=/usr/local/cuda-13.0 python scripts/check_cuda_extension.py --arch "8.0;9.0"
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="8.0;9.0", help="TORCH_CUDA_ARCH_LIST to compile for (default: %(default)s)")
    args = parser.parse_args(argv)
    os.environ["TORCH_CUDA_ARCH_LIST"] = args.arch
    with tempfile.TemporaryDirectory(prefix="fastsrt-cuda-build-") as folder:
        os.environ["TORCH_EXTENSIONS_DIR"] = folder  # a fresh build: a cached one has no compiler output to check
        import torch
        from torch.utils.cpp_extension import CUDA_HOME

        from fastsrt.compile_report import demangle, parse_ptxas_log, resources_table, warnings_in
        from fastsrt.ops.grid_encoding import extension

        print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), CUDA_HOME={CUDA_HOME}, "
              f"TORCH_CUDA_ARCH_LIST={args.arch}", flush=True)
        reason = extension.why_no_cuda()
        if reason:
            print(f"FAILED: the CUDA kernels cannot be compiled here: {reason}")
            return 1
        start = time.perf_counter()
        module, problem = extension.build_extension()
        log_path = extension.build_folder(True) / extension.LOG_NAME
        log = log_path.read_text(errors="replace") if log_path.is_file() else ""
        print(f"build: {time.perf_counter() - start:.0f} s")
        if module is None:
            print(log[-6000:])
            print(f"FAILED: {problem}")
            return 1
        kernels = parse_ptxas_log(log)
        print(resources_table(kernels))
        findings = [f"warning in fastsrt's sources: {line}" for line in warnings_in(log, list(extension.SOURCES))]
        findings += [f"ptxas: {line.strip()}" for line in log.splitlines() if "ptxas warning" in line]
        findings += [f"{k.arch} {name}: spills {k.spill_stores}/{k.spill_loads} bytes (stores/loads)"
                     for k, name in zip(kernels, demangle([k.name for k in kernels])) if k.spills]
        wanted = {f"sm_{a.replace('.', '').split('+')[0]}" for a in args.arch.replace(" ", ";").split(";") if a}
        names = {k.name for k in kernels}
        findings += [f"{name} was not compiled for {arch}" for name in sorted(names) for arch in sorted(wanted)
                     if not any(k.name == name and k.arch == arch for k in kernels)]
        if not module.has_cuda():
            findings.append("the built library has no CUDA kernels")
        if not kernels:
            findings.append("no ptxas report in the build log (was -Xptxas -v passed?)")
    for finding in findings:
        print(f"FAILED {finding}")
    if findings:
        return 1
    print(f"CUDA extension: {len(names)} kernels compiled for {', '.join(sorted(wanted))}: no warnings in csrc/, "
          "no register spills")
    return 0


if __name__ == "__main__":
    sys.exit(main())
