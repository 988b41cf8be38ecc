"""Plumbing shared by bench/warp_aggregate.py and bench/srt_e2e.py: the device's name, timing,
peak memory, a row per fresh process, and results files that are saved after every row and
merged by row key, so that a grid can be measured in several shorter commands.
"""
from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # fastsrt from this checkout, not installed


def device_name(device: torch.device) -> tuple[str, str]:
    """(the device's name, its slug in result file names): "NVIDIA H100 80GB HBM3" ->
    "nvidia-h100-80gb-hbm3" (the other benches' slug too); any CPU -> "cpu"."""
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
    return f"CPU ({model}, {torch.get_num_threads()} torch threads)", "cpu"


def versions() -> dict:
    """torch, triton and timm versions ("not installed" where missing)."""
    found = {"torch": torch.__version__}
    for name in ("triton", "timm"):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            found[name] = "not installed"
    return found


def command_line(script: str, argv: Sequence[str] | None = None) -> str:
    """The command that reproduces this run, from the repository root."""
    return " ".join(["python", os.path.relpath(script, ROOT), *(sys.argv[1:] if argv is None else argv)])


def synchronize(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(call: Callable[[], object], device: torch.device, warmup: int, repeats: int,
              seconds: float = float("inf")) -> list[float]:
    """Seconds of each timed call (synchronised on CUDA) after ``warmup`` untimed calls: at
    least 3 and at most ``repeats`` calls, stopping early once they took ``seconds`` in all."""
    for _ in range(warmup):
        call()
    times: list[float] = []
    while len(times) < min(3, repeats) or (len(times) < repeats and sum(times) < seconds):
        synchronize(device)
        start = time.perf_counter()
        call()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def median_ms(times: Sequence[float]) -> float:
    return statistics.median(times) * 1e3


class PeakMemory:
    """The peak memory a block needs beyond what was in use when it started, in MiB (``.mib``).
    CUDA: torch.cuda.max_memory_allocated minus memory_allocated before. CPU: the process's peak
    resident set (VmHWM) minus its resident set before; meaningful in a fresh process per row,
    whose earlier peak lies below the block's (run_row_process)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.mib: float | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.before = _resident_bytes()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _status_kib("VmHWM") * 1024
        self.mib = max(peak - self.before, 0) / 2**20


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def available_bytes(device: torch.device) -> int:
    """Memory a row may use: free GPU memory, or the machine's MemAvailable."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) * 1024


def run_row_process(script: str, spec: dict, timeout: float | None) -> dict:
    """Runs ``script --row SPEC`` in a fresh process (its peak memory is the row's own) and
    returns the JSON dict it prints last, or {"error": why} when it failed or timed out."""
    try:
        done = subprocess.run([sys.executable, script, "--row", json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    return {"error": f"failed: {last[:200]}"}


class Results:
    """A results file pair <out>/<name>-<slug>.json and .md. Rows already in the JSON are kept;
    a new row replaces the one with the same key (``key_fields``). ``save`` rewrites both files
    atomically, so a command cut short by a time limit keeps every row it finished."""

    def __init__(self, out_dir: Path, name: str, slug: str, key_fields: Sequence[str]):
        self.json_path = Path(out_dir) / f"{name}-{slug}.json"
        self.md_path = self.json_path.with_suffix(".md")
        self.key_fields = tuple(key_fields)
        self.previous = json.loads(self.json_path.read_text()) if self.json_path.exists() else {}
        self.rows: list[dict] = list(self.previous.get("rows", []))

    def key(self, row: dict) -> tuple:
        return tuple(row.get(field) for field in self.key_fields)

    def add(self, row: dict) -> None:
        for i, old in enumerate(self.rows):
            if self.key(old) == self.key(row):
                self.rows[i] = row
                return
        self.rows.append(row)

    def commands(self) -> list[str]:
        """The distinct commands that measured the rows, in first-seen order."""
        return list(dict.fromkeys(row["command"] for row in self.rows if "command" in row))

    def save(self, report: dict, markdown: Callable[[dict], str]) -> dict:
        """Writes ``report`` with the merged rows (and the commands behind them) and its Markdown."""
        report = {**report, "commands": self.commands(), "rows": self.rows}
        _write_atomic(self.json_path, json.dumps(report, indent=1) + "\n")
        _write_atomic(self.md_path, markdown(report))
        return report


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"
