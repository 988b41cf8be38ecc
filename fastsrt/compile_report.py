"""Reading compiler output: the resource report that ``ptxas -v`` writes for each compiled GPU
kernel (registers per thread, spill stores and loads, stack frame), and the warnings a build log
has for given source files. Both nvcc (``-Xptxas -v``, the CUDA extension) and
Triton (its bundled ptxas, always run with ``-v``) write it in this form:

    ptxas info    : Compiling entry function '_Z7forwardPf' for 'sm_90'
    ptxas info    : Function properties for _Z7forwardPf
        8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
    ptxas info    : Used 40 registers, used 0 barriers, 360 bytes cmem[0]

Torch-free, so that the Triton compile checks can use it in an environment with only Triton.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")


@dataclass
class KernelResources:
    name: str  # the mangled name, as ptxas reports it
    arch: str  # "sm_90"
    registers: int = 0
    spill_stores: int = 0  # bytes
    spill_loads: int = 0
    stack_frame: int = 0

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


def parse_ptxas_log(text: str) -> list[KernelResources]:
    """Every entry function (kernel) in a ``ptxas -v`` report, in the order compiled. A kernel
    compiled for several architectures appears once per architecture. The spills of non-inlined
    device functions a kernel calls are reported under their own names and are not counted here."""
    kernels: list[KernelResources] = []
    current: KernelResources | None = None
    properties_of = None  # the function whose "Function properties" block is being read
    for line in text.splitlines():
        if match := _ENTRY.search(line):
            current = KernelResources(match[1], match[2])
            kernels.append(current)
        elif match := _PROPERTIES.search(line):
            properties_of = match[1]
        elif (match := _FRAME.search(line)) and current is not None and properties_of == current.name:
            current.stack_frame, current.spill_stores, current.spill_loads = (int(g) for g in match.groups())
        elif (match := _USED.search(line)) and current is not None:
            current.registers = int(match[1])
    return kernels


def warnings_in(log: str, files: list[str]) -> list[str]:
    """The lines of a build log that are warnings located in one of ``files`` (base names), as
    gcc (``path/file.cpp:12:5: warning: ...``) and nvcc (``path/file.cu(12): warning #177-D: ...``)
    write them; warnings in other files (torch's headers, generated code) are left out."""
    location = re.compile(r"(?:^|[/\\\s])(" + "|".join(re.escape(f) for f in files) + r")(?::\d+|\(\d+\))")
    return [line.strip() for line in log.splitlines()
            if re.search(r"\bwarning\b", line, re.IGNORECASE) and location.search(line.split("warning")[0])]


def demangle(names: list[str]) -> list[str]:
    """C++ names readable (c++filt where it exists, else as given)."""
    if not names or shutil.which("c++filt") is None:
        return list(names)
    done = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    readable = done.stdout.splitlines()
    return readable if done.returncode == 0 and len(readable) == len(names) else list(names)


def resources_table(kernels: list[KernelResources], name_width: int = 80) -> str:
    """One line per kernel and architecture: registers, spill stores/loads, stack frame, name."""
    names = demangle([k.name for k in kernels])
    lines = [f"{'arch':<7} {'regs':>4} {'spill st/ld (B)':>15} {'stack (B)':>9}  kernel"]
    for kernel, name in zip(kernels, names):
        spill = f"{kernel.spill_stores}/{kernel.spill_loads}"
        lines.append(f"{kernel.arch:<7} {kernel.registers:>4} {spill:>15} {kernel.stack_frame:>9}  "
                     f"{name[:name_width]}{'...' if len(name) > name_width else ''}")
    return "\n".join(lines)
