"""The plumbing the benchmark suites and their report share: the device's name, package versions,
peak memory, timing one path through pytest-benchmark, merging result rows by key, atomic saves.

What a suite records per benchmark (``benchmark.extra_info``, read by bench/report.py):
    impl       the path asked for (the row's label, with ``dtype`` where it is not float32)
    ran        what actually ran, as the path reports it
    baseline   True for the row a group's ratios are taken against (the reference path)
    shape      the inputs' shape parameters (views, size, channels, batch, ...); ``views`` and
               ``size`` (and ``points``, ``batch``) are the report's plot axes
    images     images per call, where time per image means something (SRT, DVT)
    peak_mib   see PeakMemory; build_s, first_call_s: building the path, its first call
    gbps       bytes_moved / median time, where a minimum traffic is known (warp_aggregate)
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib
import math
import os
import platform
import re
import shlex
import time
from collections.abc import Callable, Iterable

import pytest
import torch

from fastsrt.io import atomic_path

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
VERSIONED = ("torch", "triton", "timm", "onnxruntime", "onnx", "tensorrt")
# the timed rounds of a row: enough to fill ROW_SECONDS, at least MIN_ROUNDS, at most MAX_ROUNDS
ROW_SECONDS = {"cpu": 1.0, "cuda": 2.0}
MIN_ROUNDS = {"cpu": 2, "cuda": 5}
MAX_ROUNDS = 200
PEAK_MEMORY_NOTE = (
    "peak MiB: the memory a path's build and first call need beyond what was allocated before them (inputs, "
    "weights), compilation and CUDA-graph capture included. CUDA: torch.cuda.max_memory_allocated, torch's "
    "allocator only (TensorRT's and ONNX Runtime's own memory does not show). CPU: the growth of the process's peak "
    "resident set (VmHWM, reset before; glibc's free memory handed back first, so memory earlier rows freed counts)")
requires_cuda = pytest.mark.skipif(DEVICE.type != "cuda", reason="GPU-only row: needs a CUDA GPU")


def device_name(device: torch.device = DEVICE) -> tuple[str, str]:
    """(the device's name, its slug in result file names): "NVIDIA H100 80GB HBM3" ->
    "nvidia-h100-80gb-hbm3"; any CPU -> "cpu"."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return name, re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU ({model}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)", "cpu"


def versions() -> dict[str, str]:
    """The version of each package in VERSIONED, "not installed" where it does not import."""
    found = {}
    for name in VERSIONED:
        try:
            found[name] = importlib.import_module(name).__version__
        except Exception:  # ImportError, or a package that fails on import on this machine
            found[name] = "not installed"
    return found


def load_average() -> list[float]:
    """The 1-, 5- and 15-minute load averages: above the core count, other processes shared the CPU."""
    return [round(value, 2) for value in os.getloadavg()]


def command_line(args: Iterable[str]) -> str:
    """The pytest command that reproduces a run, from the repository root."""
    return "python -m pytest " + shlex.join(args)


def synchronize(device: torch.device = DEVICE) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_bytes(device: torch.device = DEVICE) -> int:
    """Memory a benchmark may plan with: the GPU's total memory, or the machine's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) * 1024


class PeakMemory:
    """The peak memory of a block beyond what was allocated when it began, in MiB (``.mib``).

    CUDA: torch.cuda.max_memory_allocated minus memory_allocated at the start (torch's allocator
    only: TensorRT's and ONNX Runtime's own allocations do not show). CPU: the process's peak
    resident set (VmHWM, reset at the start through /proc/self/clear_refs) minus its resident set
    at the start, after glibc has handed its free memory back (malloc_trim), so that memory freed by
    earlier rows and reused here still counts. None where the kernel refuses the reset.
    """

    def __init__(self, device: torch.device = DEVICE):
        self.device = torch.device(device)
        self.mib: float | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            return self
        _trim_heap()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
            self.before = _status_kib("VmRSS") * 1024
        except OSError:
            self.before = None
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.before is None:
            return
        else:
            peak = _status_kib("VmHWM") * 1024
        self.mib = round(max(peak - self.before, 0) / 2**20, 1)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _trim_heap() -> None:
    library = ctypes.util.find_library("c")
    if library:
        try:
            ctypes.CDLL(library).malloc_trim(0)
        except AttributeError:  # not glibc
            pass


def copy_bandwidth(device: torch.device = DEVICE) -> float:
    """The device's copy bandwidth in GB/s: 2 x bytes / time of copying a large float32 tensor, best of 10."""
    source = torch.randn(2**28 if device.type == "cuda" else 2**26, device=device)
    target = torch.empty_like(source)
    best = math.inf
    for _ in range(11):  # the first is a warm-up
        synchronize(device)
        start = time.perf_counter()
        target.copy_(source)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return round(2 * source.numel() * 4 / best / 1e9, 2)


def params(cases: Iterable, gpu_only: Callable[[object], bool]) -> list:
    """pytest.param per case (each has an ``id``); the GPU-only ones skip without a GPU."""
    return [pytest.param(case, id=case.id, marks=[requires_cuda] if gpu_only(case) else []) for case in cases]


def measure(benchmark, build: Callable[[], Callable[[], object]], warmup: bool = True, bytes_moved: int | None = None,
            **info):
    """Times one path with pytest-benchmark and returns its output, for the caller's check.

    ``build()`` makes the path (compiles, captures, builds engines) and returns the call to time.
    Every timed call ends with a CUDA synchronisation. With ``warmup``, the first call (which may
    compile) and a second, which sizes the rounds (enough for ROW_SECONDS), are untimed, then
    the timed rounds follow; without it the first call is the one timed call. peak_mib: over
    the build and the first call (PeakMemory). With --benchmark-disable: one call, nothing measured.
    """
    benchmark.extra_info.update(info)
    if benchmark.disabled:
        return benchmark.pedantic(synchronized(build()))
    with PeakMemory(DEVICE) as memory:
        start = time.perf_counter()
        timed = synchronized(build())
        built = time.perf_counter()
        output = timed() if warmup else benchmark.pedantic(timed, rounds=1)
        first = time.perf_counter() - built
    benchmark.extra_info.update(peak_mib=memory.mib, build_s=round(built - start, 3), first_call_s=round(first, 4))
    if warmup:
        start = time.perf_counter()
        timed()
        rounds = math.ceil(ROW_SECONDS[DEVICE.type] / max(time.perf_counter() - start, 1e-6))
        benchmark.pedantic(timed, rounds=min(max(rounds, MIN_ROUNDS[DEVICE.type]), MAX_ROUNDS))
    if bytes_moved is not None:
        benchmark.extra_info["gbps"] = round(bytes_moved / benchmark.stats.stats.median / 1e9, 3)
    return output


def synchronized(call: Callable[[], object]) -> Callable[[], object]:
    """``call`` followed by a CUDA synchronisation, so that a timer around it sees the GPU's work."""

    def timed():
        output = call()
        synchronize(DEVICE)
        return output

    return timed


def merge_rows(old: list[dict], new: list[dict], key: str = "name") -> list[dict]:
    """``old`` with each row that ``new`` measured again replaced in place, then the rest of ``new``."""
    fresh = {row[key]: row for row in new}
    merged = [fresh.pop(row[key], row) for row in old]
    return merged + list(fresh.values())


def save_text(path, text: str) -> None:
    """Writes ``text`` to ``path`` atomically: a reader never sees half a file."""
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def save_figure(path, figure) -> None:
    """Saves a matplotlib figure as PNG atomically."""
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
