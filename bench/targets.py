"""The benchmark targets of docs/benchmarks.md, in one table: bench/report.py judges each results
file against them and scripts/gpu_check.sh prints them as its last lines (met / MISSED / not
measured). A target with no bound is a record: the value is reported, nothing is judged.

The reasoning behind each number is in docs/benchmarks.md; change a bound here and there together.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# a verdict's status: the value met or missed the bound; or it was measured where the target does
# not apply (a CPU, other shapes); or the target is a record
MET, MISSED, NO_VERDICT, RECORDED, NOT_MEASURED = "met", "MISSED", "no verdict here", "recorded", "not measured"


@dataclass(frozen=True)
class Target:
    key: str  # the name verdicts carry in bench/results/<op>-<device>.json
    op: str  # the suite whose results hold it
    goal: str  # the target in words
    bound: float | None = None  # None: a record
    at_most: bool = False  # the value must be <= bound (else >=)
    unit: str = "x"  # how values print: "x", "share", "ms", "s", "images/s", "TFLOP/s"
    cpu_only: bool = False  # a target for CPU runs (a GPU run's table leaves it out)

    def status(self, value: float, applies: bool) -> str:
        if self.bound is None:
            return RECORDED
        if not applies:
            return NO_VERDICT
        return MET if (value <= self.bound if self.at_most else value >= self.bound) else MISSED

    def bound_text(self) -> str:
        return f"{'<=' if self.at_most else '>='} {show(self.bound, self.unit)}"


def show(value: float, unit: str) -> str:
    if unit == "x":
        return f"{value:.3g}x"
    if unit == "share":
        return f"{100 * value:.3g}%"
    return f"{value:.3g} {unit}"


TARGETS = (
    Target("warp_speedup", "warp_aggregate", "warp_aggregate fused vs the reference (K=50, C=768, 518^2, mean, median)",
           20),
    Target("warp_bandwidth", "warp_aggregate", "warp_aggregate fused mean: share of the copy bandwidth", 0.7,
           unit="share"),
    Target("warp_memory", "warp_aggregate", "warp_aggregate fused peak memory / (token grids + output)", 1.2,
           at_most=True),
    Target("warp_cpu_speed", "warp_aggregate", "CPU: warp_aggregate chunked vs the reference", 1,
           cpu_only=True),
    Target("warp_cpu_memory", "warp_aggregate", "CPU: warp_aggregate chunked peak memory / the reference's", 0.2,
           at_most=True, cpu_only=True),
    Target("srt_speedup", "srt_e2e", "SRT fused bf16 vs the authors' fp32 loop (K=50, 518^2)", 10),
    Target("srt_floor", "srt_e2e", "SRT fused bf16: share of the bare-forward floor's images/s", 0.9, unit="share"),
    Target("srt_vit_s_images", "srt_e2e", "record: ViT-S/14 SRT images/s (K=50, bf16)", unit="images/s"),
    Target("matmul_rate", "srt_e2e", "record: the device's measured bf16 matrix rate", unit="TFLOP/s"),
    Target("forward_share", "srt_e2e", "record: view forwards' share of the measured bf16 matrix rate",
           unit="share"),
    Target("dvt_seconds", "dvt_fit", "DVT stage 1 per image, features + fit (paper's setting)", 5, at_most=True,
           unit="s"),
    Target("dvt_encoding", "dvt_fit", "grid encoding fwd + bwd: the extension vs torch", 3),
    Target("dvt_loss", "dvt_fit", "DVT fast fit's final loss: |gap| to the torch reference path's", 0.02,
           at_most=True, unit="share"),
    Target("denoiser_latency", "denoiser", "denoiser batch 1, 37x37: best latency", 0.3, at_most=True, unit="ms"),
    Target("denoiser_speedup", "denoiser", "denoiser batch 1, 37x37: best vs eager fp32", 5),
    Target("stream_share", "stream", "fastsrt.stream on a video: share of SRT's frames/s on frames in memory", 0.9,
           unit="share"),
)
BY_KEY = {target.key: target for target in TARGETS}


def verdict(key: str, where: str, value: float, applies: bool) -> dict:
    """One measured value of target ``key`` with its status, as results files store it."""
    return dict(target=key, where=where, value=value, status=BY_KEY[key].status(value, applies))


def overall(verdicts: list[dict]) -> str:
    """A target's status over all its verdicts: MISSED if any missed, else met if any met, ..."""
    found = {v["status"] for v in verdicts}
    for status in (MISSED, MET, RECORDED, NO_VERDICT):
        if status in found:
            return status
    return NOT_MEASURED


def summary(results: Path, slug: str, why_not: dict[str, str] | None = None) -> list[str]:
    """The targets table from ``results/<op>-<slug>.json``, one line per target: status, the goal,
    the bound and the values measured (``why_not``: op -> why its results are missing). The CPU
    targets only for a CPU (``slug`` "cpu")."""
    verdicts: dict[str, list[dict]] = {}
    for op in dict.fromkeys(target.op for target in TARGETS):
        path = results / f"{op}-{slug}.json"
        if path.exists():
            for found in json.loads(path.read_text()).get("verdicts", []):
                verdicts.setdefault(found["target"], []).append(found)
    lines = []
    for target in TARGETS:
        if target.cpu_only and slug != "cpu":
            continue
        found = verdicts.get(target.key, [])
        status = overall(found)
        goal = target.goal + (f" {target.bound_text()}" if target.bound is not None else "")
        if found:
            values = "; ".join(f"{show(v['value'], target.unit)} ({v['where']})" for v in found)
        else:
            values = (why_not or {}).get(target.op, "")
        lines.append(f"{status:<15} | {goal} | {values}")
    return lines
