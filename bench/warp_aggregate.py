"""Benchmark of warp_aggregate (inverse-warp upsample + mean/median over views, patch 14): the
reference (every view materialised) against the fast paths. Writes
bench/results/warp_aggregate-<device>.json and .md.

    python bench/warp_aggregate.py                 # GPU: K 10/50, C 384/768, 518^2 and 1036^2, mean and
                                                   #      median; reference, fused (Triton), chunked
    python bench/warp_aggregate.py --device cpu    # CPU: reduced shapes (stated in the output);
                                                   #      reference and chunked (what impl="auto" runs)

Each row runs in its own process, so that its peak memory is its own: on the GPU
torch.cuda.max_memory_allocated over the first call (token grids, output and temporaries); on the
CPU the peak resident set (VmHWM) over the first call minus the resident set before the token grids
were made. Times: warm-up calls, then the median of repeated calls (CUDA-synchronised).
gbps = the minimum bytes (token grids read once, output written once) / time; the Markdown also
gives it as a fraction of the device's copy bandwidth, measured here as 2 x bytes / time of a large
tensor copy. Token grids are random float32, one image (B = 1), the paper's view grids
(d = 1: 10 views, d = 3: 50 views), nearest upsampling, zero fill, pixel output.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, fastsrt uninstalled

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import fastsrt  # noqa: E402  (before timm, which fastsrt imports)
from fastsrt.ops.warp_aggregate import warp_aggregate  # noqa: E402

PATCH = 14
VIEW_GRIDS = {10: 1, 50: 3}  # views -> the paper's shift radius d (1 + (2d+1)^2 views)
SETTINGS = {
    "cuda": dict(views=[10, 50], channels=[384, 768], sizes=[518, 1036], impls=["reference", "fused", "chunked"]),
    # CPU (2 cores here): the reference at C=768, 518^2, K=50 would need ~200 GB; shapes cut so it fits
    "cpu": dict(views=[10, 50], channels=[32, 64], sizes=[224], impls=["reference", "chunked"]),
}
# a reference call peaks at about this many K x C x H x W float32 tensors (measured on CPU: 2.9 for
# the mean, 6.7 for the median: sorted values and int64 indices)
REFERENCE_COPIES = 7


def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def peak_rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def available_kib() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def minimum_bytes(spec: dict) -> int:
    """Token grids read once + output written once (float32)."""
    tokens = spec["views"] * spec["channels"] * (spec["height"] // PATCH) * (spec["width"] // PATCH)
    return 4 * (tokens + spec["channels"] * spec["height"] * spec["width"])


def run_row(spec: dict) -> dict:
    """One row, in this process: the first call gives the peak memory, then warm-up and timing."""
    device = torch.device(spec["device"])
    shifts = fastsrt.paper_grid(VIEW_GRIDS[spec["views"]])
    h, w = spec["height"] // PATCH, spec["width"] // PATCH
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.init()
    base_kib = rss_kib()
    tokens = torch.randn(spec["views"], 1, spec["channels"], h, w, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def call():
        out = warp_aggregate(tokens, shifts, PATCH, reduce=spec["reduce"], impl=spec["impl"])
        synchronize(device)
        return out

    try:
        ran = call().impl
        if device.type == "cuda":
            peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            peak_mib = (peak_rss_kib() - base_kib) / 1024
        call()  # warm-up
        times = []
        while len(times) < 3 or (len(times) < spec["repeats"] and sum(times) < spec["seconds"]):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    except torch.cuda.OutOfMemoryError:
        return {"ms": None, "peak_mib": None, "gbps": None, "note": "out of memory"}
    assert ran == spec["impl"], f"asked for {spec['impl']}, ran {ran}"
    ms = statistics.median(times) * 1e3
    return {"ms": round(ms, 3), "peak_mib": round(peak_mib, 1), "gbps": float(f"{minimum_bytes(spec) / ms / 1e6:.4g}")}


def copy_gbps(device: torch.device) -> float:
    """Device copy bandwidth: 2 x bytes / time of copying a large float32 tensor, best of several."""
    source = torch.randn(2**28 if device.type == "cuda" else 2**26, device=device)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(10):
        synchronize(device)
        start = time.perf_counter()
        target.copy_(source)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * source.numel() * 4 / best / 1e9


def device_name(device: torch.device) -> tuple[str, str]:
    """(human name, file-name slug)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return name, re.sub(r"[^a-z0-9]+", "-", name.lower().removeprefix("nvidia ")).strip("-")
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {torch.get_num_threads()} torch threads", "cpu"


def markdown(report: dict) -> str:
    lines = [
        f"# warp_aggregate on {report['device']}",
        "",
        f"torch {report['torch']}, triton {report['triton']}; command: `{report['command']}`",
        "",
        f"Settings: {report['settings']}. Copy bandwidth measured: {report['copy_gbps']:.1f} GB/s.",
        "",
        "| impl | reduce | views | channels | H x W | dtype | ms | peak MiB | tokens+output MiB | GB/s | % of copy | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        fraction = f"{100 * row['gbps'] / report['copy_gbps']:.0f}%" if row["gbps"] else ""
        lines.append(
            f"| {row['impl']} | {row['reduce']} | {row['views']} | {row['channels']} | {row['height']}x{row['width']} "
            f"| {row['dtype']} | {row['ms'] if row['ms'] is not None else ''} | {row['peak_mib'] if row['peak_mib'] is not None else ''} "
            f"| {minimum_bytes(row) / 2**20:.1f} | {row['gbps'] if row['gbps'] is not None else ''} | {fraction} | {row.get('note', '')} |"
        )
    lines += ["", "## Targets", ""] + [f"- {line}" for line in report["targets"]]
    return "\n".join(lines) + "\n"


def targets(report: dict) -> list[str]:
    """The issue's targets, checked on the rows measured (views 50, the largest C, the smallest size)."""
    rows = report["rows"]
    fast = "fused" if report["device_type"] == "cuda" else "chunked"
    channels, size = max(r["channels"] for r in rows), min(r["height"] for r in rows)

    def pick(impl, reduce):
        return next((r for r in rows if (r["impl"], r["reduce"], r["views"], r["channels"], r["height"]) == (impl, reduce, 50, channels, size)), None)

    lines = []
    for reduce in ("mean", "median"):
        ref, new = pick("reference", reduce), pick(fast, reduce)
        where = f"{reduce}, K=50, C={channels}, {size}x{size}"
        if not new or new["ms"] is None:
            lines.append(f"{where}: {fast} row missing")
            continue
        if ref and ref["ms"] is not None:
            speedup, memory = ref["ms"] / new["ms"], new["peak_mib"] / ref["peak_mib"]
            goal = "20x" if fast == "fused" else "1x"
            verdict = "met" if speedup >= (20 if fast == "fused" else 1) else "MISSED"
            lines.append(f"{where}: {fast} is {speedup:.1f}x faster than the reference (goal > {goal}: {verdict}); "
                         f"peak memory {memory:.3f} of the reference's (goal <= 0.2 on CPU: {'met' if memory <= 0.2 else 'MISSED'})")
        else:
            lines.append(f"{where}: reference {ref.get('note', 'not run') if ref else 'not run'}; no speed-up to compute")
        if fast == "fused":
            fraction = new["gbps"] / report["copy_gbps"]
            minimum = minimum_bytes(new) / 2**20
            lines.append(f"{where}: fused reaches {100 * fraction:.0f}% of copy bandwidth (goal >= 70% for the mean"
                         f"{': ' + ('met' if fraction >= 0.7 else 'MISSED') if reduce == 'mean' else ''}); peak "
                         f"{new['peak_mib'] / minimum:.2f}x tokens+output (goal <= 1.2: {'met' if new['peak_mib'] <= 1.2 * minimum else 'MISSED'})")
    if fast != "fused":
        lines.append("GPU targets (fused >= 20x faster than the reference at K=50, C=768, 518^2; >= 70% of copy "
                     "bandwidth for the mean; peak <= 1.2x tokens+output): not measured in this run (no GPU)")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--timeout", type=float, default=900, help="seconds per row before it is recorded as timed out")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in this process
    args = parser.parse_args()
    if args.row:
        print(json.dumps(run_row(json.loads(args.row))))
        return 0

    device = torch.device(args.device)
    settings = SETTINGS[device.type]
    name, slug = device_name(device)
    timing = dict(repeats=10, seconds=10.0) if device.type == "cuda" else dict(repeats=5, seconds=30.0)
    specs = [
        dict(op="warp_aggregate", impl=impl, reduce=reduce, views=views, channels=channels, height=size, width=size,
             dtype="float32", device=args.device, **timing)
        for views, channels, size, reduce, impl in itertools.product(
            settings["views"], settings["channels"], settings["sizes"], ["mean", "median"], settings["impls"])
    ]
    rows = []
    for spec in tqdm(specs, desc="warp_aggregate rows", unit="row"):
        row = {key: spec[key] for key in ("op", "impl", "reduce", "views", "channels", "height", "width", "dtype")}
        need_kib = REFERENCE_COPIES * spec["views"] * spec["channels"] * spec["height"] * spec["width"] * 4 / 1024
        if device.type == "cpu" and spec["impl"] == "reference" and need_kib > 0.8 * available_kib():
            rows.append(row | {"ms": None, "peak_mib": None, "gbps": None, "note": f"skipped: needs ~{need_kib / 2**20:.0f} GiB"})
            continue
        try:
            done = subprocess.run([sys.executable, os.path.abspath(__file__), "--row", json.dumps(spec)],
                                  capture_output=True, text=True, timeout=args.timeout)
            result = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else \
                {"ms": None, "peak_mib": None, "gbps": None, "note": f"failed: {(done.stderr.strip().splitlines() or ['?'])[-1][:200]}"}
        except subprocess.TimeoutExpired:
            result = {"ms": None, "peak_mib": None, "gbps": None, "note": f"timed out after {args.timeout:.0f} s"}
        rows.append(row | result)
        tqdm.write(json.dumps(rows[-1]))

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    report = {
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "command": " ".join(["python", "bench/warp_aggregate.py"] + sys.argv[1:]),
        "settings": (f"patch {PATCH}, B=1, float32, nearest, zero fill, pixel output; views {settings['views']}, "
                     f"channels {settings['channels']}, sizes {settings['sizes']}; impls {settings['impls']}"),
        "copy_gbps": round(copy_gbps(device), 2),
        "rows": rows,
    }
    report["targets"] = targets(report)
    os.makedirs(args.out, exist_ok=True)
    for suffix, text in ((".json", json.dumps(report, indent=2) + "\n"), (".md", markdown(report))):
        path = os.path.join(args.out, f"warp_aggregate-{slug}{suffix}")
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    print(markdown(report))
    print(f"saved {os.path.join(args.out, f'warp_aggregate-{slug}')}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
