"""Benchmark of warp_aggregate (inverse-warp upsample + mean/median over views, patch 14): the
reference (every view materialised) against the fast paths. Writes
bench/results/warp_aggregate-<device>.json and .md, saved after every row and merged with the rows
already there (same impl/reduce/views/channels/size: replaced), so the grid can be measured in
several commands.

    python bench/warp_aggregate.py                 # GPU: K 10/50, C 384/768, 518^2 and 1036^2, mean and
                                                   #      median; reference, reference_sliced, fused, chunked
    python bench/warp_aggregate.py --device cpu    # CPU: reduced shapes (stated in the output);
                                                   #      reference and chunked (what impl="auto" runs)
    python bench/warp_aggregate.py --sizes 518 --views 50      # a part of the grid (also --channels,
                                                               # --reduces, --impls)

On a GPU under a 600-s limit per command, split the grid, e.g. one command per (size, views):
each row costs a process start, Triton compilation and about 10 timed calls, the reference rows
that cannot fit are skipped without being run, and --timeout bounds a row.

Implementations: "reference" is warp_aggregate_reference on all channels; where its estimated need
(REFERENCE_COPIES x K x C x H x W float32) exceeds the device's memory it is skipped, and
"reference_sliced" stands in for it: the same reference over slices of at most 64 channels (fewer
where a slice would not fit), one call per slice, times summed. The reference is linear in C, so
that is what it would take with the memory, and the speed-up targets use it where the full
reference has no time. "fused" and "chunked" are warp_aggregate(impl=...).

Each row runs in its own process, so that its peak memory is its own: on the GPU
torch.cuda.max_memory_allocated over the first call minus what was allocated before the token
grids (token grids, output and temporaries); on the CPU the peak resident set (VmHWM) over the
first call minus the resident set before the token grids were made. Times: one warm-up call,
then the median of repeated calls (CUDA-synchronised). gbps = the minimum bytes (token grids read
once, output written once) / time; the Markdown also gives it as a fraction of the device's copy
bandwidth, measured as 2 x bytes / time of a large tensor copy. Token grids are random float32,
one image (B = 1), the paper's view grids (d = 1: 10 views, d = 3: 50 views), nearest upsampling,
zero fill, pixel output.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/_common (puts the repo root on sys.path)

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402

import torch  # noqa: E402
from _common import (  # noqa: E402
    PeakMemory,
    Results,
    available_bytes,
    command_line,
    device_name,
    median_ms,
    run_row_process,
    synchronize,
    time_call,
    verdict,
    versions,
)
from tqdm import tqdm  # noqa: E402

import fastsrt  # noqa: E402  (before timm, which fastsrt imports)
from fastsrt.ops.warp_aggregate import warp_aggregate, warp_aggregate_reference  # noqa: E402

PATCH = 14
VIEW_GRIDS = {10: 1, 50: 3}  # views -> the paper's shift radius d (1 + (2d+1)^2 views)
IMPLS = ("reference", "reference_sliced", "fused", "chunked")
SETTINGS = {
    "cuda": dict(views=[10, 50], channels=[384, 768], sizes=[518, 1036], impls=list(IMPLS)),
    # CPU (2 cores here): the reference at C=768, 518^2, K=50 would need ~200 GB; shapes cut so it fits
    "cpu": dict(views=[10, 50], channels=[32, 64], sizes=[224], impls=["reference", "chunked"]),
}
# a reference call peaks at about this many K x C x H x W float32 tensors (measured on CPU: 2.9 for
# the mean, 6.7 for the median: sorted values and int64 indices)
REFERENCE_COPIES = 7
SLICE_CHANNELS = 64
KEY = ("impl", "reduce", "views", "channels", "height", "width", "dtype")


def reference_bytes(views: int, channels: int, height: int, width: int) -> int:
    return REFERENCE_COPIES * views * channels * height * width * 4


def minimum_bytes(spec: dict) -> int:
    """Token grids read once + output written once (float32)."""
    tokens = spec["views"] * spec["channels"] * (spec["height"] // PATCH) * (spec["width"] // PATCH)
    return 4 * (tokens + spec["channels"] * spec["height"] * spec["width"])


def slice_channels(spec: dict, memory: int) -> int:
    """Channels per reference_sliced call: at most SLICE_CHANNELS, halved until a slice's
    estimated need fits 80% of ``memory``."""
    channels = min(spec["channels"], SLICE_CHANNELS)
    while channels > 1 and reference_bytes(spec["views"], channels, spec["height"], spec["width"]) > 0.8 * memory:
        channels //= 2
    return channels


def make_call(spec: dict, tokens: torch.Tensor, shifts, device: torch.device):
    """The timed call of one row (it returns the implementation that ran), and a note on it."""
    if spec["impl"] == "reference_sliced":
        step = spec["slice_channels"]
        slices = [tokens[:, :, start : start + step] for start in range(0, spec["channels"], step)]

        def sliced():
            for part in slices:
                warp_aggregate_reference(part, shifts, PATCH, reduce=spec["reduce"])
            synchronize(device)
            return "reference_sliced"

        return sliced, f"the reference over {len(slices)} slices of {step} channels, one call each, times summed"

    def call():
        out = warp_aggregate(tokens, shifts, PATCH, reduce=spec["reduce"], impl=spec["impl"])
        synchronize(device)
        return out.impl

    return call, ""


def run_row(spec: dict) -> dict:
    """One row, in this process: the first call gives the peak memory, then warm-up and timing."""
    device = torch.device(spec["device"])
    shifts = fastsrt.paper_grid(VIEW_GRIDS[spec["views"]])
    h, w = spec["height"] // PATCH, spec["width"] // PATCH
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.init()
    try:
        with PeakMemory(device) as memory:  # from before the token grids, over the first call
            tokens = torch.randn(spec["views"], 1, spec["channels"], h, w, device=device)
            call, note = make_call(spec, tokens, shifts, device)
            ran = call()
        times = time_call(call, device, warmup=1, repeats=spec["repeats"], seconds=spec["seconds"])
    except torch.cuda.OutOfMemoryError:
        return {"ms": None, "peak_mib": None, "gbps": None, "note": "out of memory"}
    assert ran == spec["impl"], f"asked for {spec['impl']}, ran {ran}"
    ms = median_ms(times)
    return {"ms": round(ms, 3), "peak_mib": round(memory.mib, 1), "gbps": float(f"{minimum_bytes(spec) / ms / 1e6:.4g}"),
            "note": note}


def copy_gbps(device: torch.device) -> float:
    """Device copy bandwidth: 2 x bytes / time of copying a large float32 tensor, best of several."""
    source = torch.randn(2**28 if device.type == "cuda" else 2**26, device=device)
    target = torch.empty_like(source)
    times = time_call(lambda: target.copy_(source), device, warmup=1, repeats=10)
    return 2 * source.numel() * 4 / min(times) / 1e9


def markdown(report: dict) -> str:
    lines = [
        f"# warp_aggregate on {report['device']}",
        "",
        f"torch {report['torch']}, triton {report['triton']}; commands: " + "; ".join(f"`{c}`" for c in report["commands"]),
        "",
        f"Settings: {report['settings']}. Copy bandwidth measured: {report['copy_gbps']:.1f} GB/s.",
        "",
        f"1-minute load average {report['load_average'][0]} at the start and {report['load_average'][1]} at the end of the "
        f"last command, {report['threads']} torch threads (a load above the thread count means other processes shared "
        "the cores: times are noisy).",
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
    rows = [r for r in report["rows"] if r["views"] == 50]
    on_gpu = report["device_type"] == "cuda"
    fast = "fused" if on_gpu else "chunked"
    if not rows:
        return ["no K=50 rows measured: targets not measured"]
    channels, size = max(r["channels"] for r in rows), min(r["height"] for r in rows)

    def pick(impl, reduce):
        return next((r for r in rows if (r["impl"], r["reduce"], r["channels"], r["height"]) == (impl, reduce, channels, size)
                     and r["ms"] is not None), None)

    lines = []
    for reduce in ("mean", "median"):
        where = f"{reduce}, K=50, C={channels}, {size}x{size}"
        new = pick(fast, reduce)
        if not new:
            lines.append(f"{where}: no {fast} time measured; targets not measured")
            continue
        full, sliced = pick("reference", reduce), pick("reference_sliced", reduce)
        baseline = full or sliced
        if baseline:
            label = "the reference" if full else "the channel-sliced reference (the full one does not fit)"
            speedup = baseline["ms"] / new["ms"]
            goal = 20 if on_gpu else 1
            lines.append(f"{where}: {fast} is {speedup:.1f}x faster than {label} (goal >= {goal}x: {verdict(speedup >= goal)})")
        else:
            lines.append(f"{where}: neither the reference nor its channel-sliced form has a time; speed-up not measured")
        if full and not on_gpu:  # the CPU memory goal compares with the reference's own peak
            memory = new["peak_mib"] / full["peak_mib"]
            lines.append(f"{where}: chunked peak memory is {memory:.3f} of the reference's (goal <= 0.2: {verdict(memory <= 0.2)})")
        if on_gpu:
            fraction = new["gbps"] / report["copy_gbps"]
            minimum = minimum_bytes(new) / 2**20
            bandwidth = f" (goal >= 70%: {verdict(fraction >= 0.7)})" if reduce == "mean" else " (no goal for the median)"
            lines.append(f"{where}: fused reaches {100 * fraction:.0f}% of copy bandwidth{bandwidth}; peak "
                         f"{new['peak_mib'] / minimum:.2f}x tokens+output (goal <= 1.2: {verdict(new['peak_mib'] <= 1.2 * minimum)})")
    if not on_gpu:
        lines.append("GPU targets (fused >= 20x faster than the reference at K=50, C=768, 518^2; >= 70% of copy "
                     "bandwidth for the mean; peak <= 1.2x tokens+output): not measured here (no GPU)")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--views", type=int, nargs="+", choices=sorted(VIEW_GRIDS))
    parser.add_argument("--channels", type=int, nargs="+")
    parser.add_argument("--sizes", type=int, nargs="+", help="output sides (multiples of 14)")
    parser.add_argument("--reduces", nargs="+", choices=["mean", "median"], default=["mean", "median"])
    parser.add_argument("--impls", nargs="+", choices=IMPLS)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--timeout", type=float, default=300, help="seconds per row before it is recorded as timed out")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in this process
    args = parser.parse_args()
    if args.row:
        print(json.dumps(run_row(json.loads(args.row))))
        return 0

    device = torch.device(args.device)
    defaults = SETTINGS[device.type]
    views, channels = args.views or defaults["views"], args.channels or defaults["channels"]
    sizes, impls = args.sizes or defaults["sizes"], args.impls or defaults["impls"]
    bad = [size for size in sizes if size % PATCH]
    if bad:
        parser.error(f"--sizes must be multiples of {PATCH}, got {bad}")
    name, slug = device_name(device)
    results = Results(args.out, "warp_aggregate", slug, KEY)
    command = command_line(__file__)
    timing = dict(repeats=10, seconds=10.0) if device.type == "cuda" else dict(repeats=5, seconds=30.0)
    memory = available_bytes(device) if device.type == "cpu" else torch.cuda.get_device_properties(device).total_memory
    load_before = os.getloadavg()[0]
    report = {
        "device": name,
        "threads": torch.get_num_threads(),
        "device_type": device.type,
        **{k: v for k, v in versions().items() if k != "timm"},
        "command": command,
        "settings": (f"patch {PATCH}, B=1, float32, nearest, zero fill, pixel output; this command: views {views}, "
                     f"channels {channels}, sizes {sizes}, reduces {args.reduces}, impls {impls}"
                     + ("; CPU: shapes REDUCED from the issue's (C 384/768, 518^2 and 1036^2)" if device.type == "cpu" else "")),
        "copy_gbps": round(copy_gbps(device), 2),
    }
    specs = [
        dict(op="warp_aggregate", impl=impl, reduce=reduce, views=k, channels=c, height=size, width=size,
             dtype="float32", device=args.device, **timing)
        for k, c, size, reduce, impl in itertools.product(views, channels, sizes, args.reduces, impls)
    ]
    saved = None
    for spec in tqdm(specs, desc="warp_aggregate rows", unit="row"):
        row = {key: spec[key] for key in ("op", *KEY)} | {"command": command}
        need = reference_bytes(spec["views"], spec["channels"], spec["height"], spec["width"])
        if spec["impl"] == "reference_sliced":
            spec["slice_channels"] = slice_channels(spec, memory)
            if spec["slice_channels"] >= spec["channels"]:
                continue  # the same as the reference row
        if spec["impl"] == "reference" and need > 0.8 * memory:
            result = {"ms": None, "peak_mib": None, "gbps": None,
                      "note": f"skipped: needs ~{need / 2**30:.0f} GiB of {memory / 2**30:.0f} GiB"}
        else:
            result = run_row_process(os.path.abspath(__file__), spec, args.timeout)
            if "error" in result:
                result = {"ms": None, "peak_mib": None, "gbps": None, "note": result["error"]}
        results.add(row | result)
        tqdm.write(json.dumps(row | result))
        report["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        report["targets"] = targets({**report, "rows": results.rows})
        saved = results.save(report, markdown)
    if saved is None:
        print("no rows to measure for these filters")
        return 1
    print(markdown(saved))
    print(f"saved {results.json_path} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
