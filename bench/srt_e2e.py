"""End-to-end SRT throughput: images per second and peak memory of a whole SRT call.

Variants, for each model x views K x batch B x dtype:
  (a) authors     the authors' style: per image, views in float32 mini-batches of 32, each view's
                  tokens nearest-upsampled and inverse-shifted one by one into a running sum
                  (float32 only, as the authors run it)
  (b) reference   fastsrt.SRT(impl="reference", dtype=...)
  (c) fused       fastsrt.SRT(impl="fused", dtype=..., cuda_graph=on CUDA)
  (d) floor       K bare backbone forwards on pre-shifted inputs, same precision and view batch
  (+) fused_views diagnostic: the fused path's view tokens alone (SRT.view_tokens, no aggregation)
All SRT rows use the paper's settings (nearest, zero padding, unmasked mean, pixel output) and
view_batch="auto". Random weights (timing only).

    python bench/srt_e2e.py              # GPU: the full grid (2 models, 518x518, K 10/50, B 1/8, fp32/bf16)
    python bench/srt_e2e.py --size 224   # any grid axis can be narrowed from the command line

On a CPU the defaults are reduced (stated in the results) and each row runs in its own process
(peak memory from the process's resident set). peak_mib is the memory a call needs beyond the
model weights and the input images (GPU: torch.cuda.max_memory_allocated over warm-up and timed
repetitions minus what was allocated before; CPU: peak RSS minus the RSS before).
Writes bench/results/srt_e2e-<device>.json and .md.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without installing fastsrt

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastsrt  # noqa: E402  (before timm: torchvision shim on a CPU-only torch)
from fastsrt.backbone import Backbone  # noqa: E402
from fastsrt.backbone_fused import auto_view_batch, precision  # noqa: E402
from fastsrt.ops.shift import shift_images  # noqa: E402
from fastsrt.views import paper_grid, random_shifts  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
IMPLS = ("authors", "reference", "fused", "floor", "fused_views")
GPU_DEFAULTS = dict(models=["vit_small_patch14_dinov2", "vit_base_patch14_dinov2"], size=518, views=[10, 50],
                    batch=[1, 8], dtypes=["float32", "bfloat16"], reps=5)
CPU_DEFAULTS = dict(models=["vit_small_patch14_dinov2", "vit_base_patch14_dinov2"], size=112, views=[10],
                    batch=[1, 2], dtypes=["float32", "bfloat16"], reps=3)


def schedule(views: int) -> list[tuple[int, int]]:
    """The paper's grid when K = 1 + (2d+1)^2 (10 -> d=1, 50 -> d=3), else K seeded random shifts within 3 px."""
    for d in range(8):
        if 1 + (2 * d + 1) ** 2 == views:
            return paper_grid(d)
    return random_shifts(views, 3)


def authors_loop(backbone: Backbone, images: torch.Tensor, shifts, mini_batch: int = 32) -> torch.Tensor:
    """The authors' style: float32, per image, views in mini-batches, a 1 x C x H x W running sum."""
    patch = backbone.patch_size
    results = []
    for image in images.split(1):
        total = None
        for start in range(0, len(shifts), mini_batch):
            chunk = shifts[start : start + mini_batch]
            views = torch.cat([shift_zero(image, dy, dx) for dy, dx in chunk])
            tokens = backbone(views).tokens[0]
            for view_tokens, (dy, dx) in zip(tokens.split(1), chunk):
                pixels = F.interpolate(view_tokens, scale_factor=patch, mode="nearest")
                warped = shift_zero(pixels, -dy, -dx)  # the inverse shift
                total = warped if total is None else total + warped
        results.append(total / len(shifts))
    return torch.cat(results)


def shift_zero(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out(y, x) = x(y - dy, x - dx), zero where that is outside."""
    out = torch.zeros_like(x)
    height, width = x.shape[-2:]
    out[..., max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)] = \
        x[..., max(-dy, 0) : height + min(-dy, 0), max(-dx, 0) : width + min(-dx, 0)]
    return out


def make_call(spec: dict, backbone: Backbone, images: torch.Tensor):
    """The timed function of one row, and a note on how it ran."""
    shifts = schedule(spec["views"])
    dtype = DTYPES[spec["dtype"]]
    impl = spec["impl"]
    if impl == "authors":
        return (lambda: authors_loop(backbone, images, shifts)), "float32 mini-batches of 32 views"
    if impl == "floor":
        views = shift_images(images, shifts)  # pre-shifted, outside the timing
        batch = images.shape[0]
        with precision(images.device, dtype):
            chunk = auto_view_batch(lambda n: backbone(views[: n * batch]), len(shifts), batch,
                                    4 * backbone.embed_dim * views.shape[-2] * views.shape[-1] // backbone.patch_size**2,
                                    images.device)

        def floor():
            with precision(images.device, dtype):
                return [backbone(views[i : i + chunk]).tokens[0] for i in range(0, len(views), chunk)]

        return floor, f"view batch {chunk}"
    cuda_graph = spec["cuda_graph"] and images.is_cuda
    srt = fastsrt.SRT(backbone, shifts, impl="reference" if impl == "reference" else "fused", dtype=dtype,
                      cuda_graph=cuda_graph, compile=spec["compile"])
    note = []
    if impl != "reference":
        note.append(f"cuda_graph={cuda_graph}, compile={spec['compile']}")
        if not images.is_cuda:
            note.append("CPU: the Triton kernel cannot run natively, the patch embedding is its torch reference")
    if impl == "fused_views":
        return (lambda: srt.view_tokens(images)), "; ".join(note + ["diagnostic: view tokens only, no aggregation"])
    return (lambda: srt(images)), "; ".join(note)


def measure(call, device: torch.device, warmup: int, reps: int) -> tuple[float, float]:
    """(median seconds per call, peak MiB beyond what was allocated before)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        sync()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        before = current_rss()
    with torch.no_grad():
        for _ in range(warmup):
            call()
        seconds = []
        for _ in range(reps):
            sync()
            start = time.perf_counter()
            call()
            sync()
            seconds.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before  # ru_maxrss: KiB on Linux
    return statistics.median(seconds), max(peak, 0) / 2**20


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_row(spec: dict) -> dict:
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    backbone = Backbone(spec["model"], pretrained=False).eval().to(device)
    images = torch.randn(spec["batch"], 3, spec["size"], spec["size"], device=device)
    row = {k: spec[k] for k in ("model", "views", "batch", "dtype", "impl")}
    try:
        call, note = make_call(spec, backbone, images)
        seconds, peak = measure(call, device, spec["warmup"], spec["reps"])
        row.update(images_per_s=round(spec["batch"] / seconds, 4), peak_mib=round(peak, 1), note=note)
    except torch.cuda.OutOfMemoryError:
        row.update(images_per_s=None, peak_mib=None, note="out of GPU memory")
    finally:
        del backbone, images
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def run_isolated(spec: dict) -> dict:
    """One row in a fresh process (a clean peak-RSS measurement on CPU)."""
    done = subprocess.run([sys.executable, __file__, "--row", json.dumps(spec)], capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    error = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    row = {k: spec[k] for k in ("model", "views", "batch", "dtype", "impl")}
    return {**row, "images_per_s": None, "peak_mib": None, "note": f"failed: {error[:200]}"}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def markdown(result: dict) -> str:
    lines = [
        f"# SRT end to end ({result['device']})", "",
        f"- torch {result['torch']}, triton {result['triton']}, timm {result['timm']}, {result['threads']} CPU threads, "
        f"1-minute load average {result['load_average'][0]} at the start and {result['load_average'][1]} at the end "
        f"(above the thread count, other processes shared the cores and the times are noisy)",
        f"- command: `{result['command']}`",
        f"- images {result['size']}x{result['size']}, random weights, warm-up {result['warmup']}, median of {result['reps']} calls",
        f"- {result['settings']}",
        "- peak MiB: memory a call needs beyond the model weights and the input images",
        "", "| model | views | batch | dtype | impl | images/s | peak MiB | note |", "|---|---:|---:|---|---|---:|---:|---|",
    ]
    for r in result["rows"]:
        speed = "-" if r["images_per_s"] is None else f"{r['images_per_s']:.3g}"
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        lines.append(f"| {r['model']} | {r['views']} | {r['batch']} | {r['dtype']} | {r['impl']} | {speed} | {peak} | {r['note']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+")
    parser.add_argument("--size", type=int)
    parser.add_argument("--views", type=int, nargs="+")
    parser.add_argument("--batch", type=int, nargs="+")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES))
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--reps", type=int)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-cuda-graph", action="store_true", help="fused rows without CUDA-graph capture")
    parser.add_argument("--compile", action="store_true", help="fused rows with torch.compile")
    parser.add_argument("--isolate", choices=["auto", "yes", "no"], default="auto",
                        help="a process per row (auto: on CPU, for the peak-RSS measurement)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row, print it as JSON
    args = parser.parse_args(argv)
    if args.row:
        print(json.dumps(run_row(json.loads(args.row))))
        return 0

    from tqdm import tqdm

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    models, size = args.models or defaults["models"], args.size or defaults["size"]
    views, batches = args.views or defaults["views"], args.batch or defaults["batch"]
    dtypes, reps = args.dtypes or defaults["dtypes"], args.reps or defaults["reps"]
    settings = ("the issue's full grid" if device.type == "cuda" else
                f"REDUCED for a CPU: {size}x{size} images instead of 518x518, K in {views} instead of [10, 50], "
                f"batch in {batches} instead of [1, 8]; 'fused' rows run the fused pipeline with the patch "
                "embedding as its torch reference, because the Triton kernel runs on CPU only in its (slow) interpreter")
    isolate = args.isolate == "yes" or (args.isolate == "auto" and device.type == "cpu")
    specs = [
        dict(model=m, views=k, batch=b, dtype=d, impl=i, size=size, reps=reps, warmup=args.warmup, device=device.type,
             cuda_graph=not args.no_cuda_graph, compile=args.compile)
        for m in models for k in views for b in batches for d in dtypes for i in args.impls
        if not (i == "authors" and d != "float32")  # the authors' loop is float32 only
    ]
    load_before = os.getloadavg()[0]
    rows = []
    for spec in tqdm(specs, desc="srt_e2e rows"):
        rows.append(run_isolated(spec) if isolate else run_row(spec))
        tqdm.write(json.dumps(rows[-1]))
    import timm

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"

    result = dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_name()})",
        torch=torch.__version__, triton=triton_version, timm=timm.__version__, threads=torch.get_num_threads(),
        command="python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv if argv is not None else sys.argv[1:])),
        size=size, warmup=args.warmup, reps=reps, settings=settings,
        load_average=[round(load_before, 2), round(os.getloadavg()[0], 2)], rows=rows,
    )
    name = f"srt_e2e-{device_slug(device)}"
    write_atomic(args.out_dir / f"{name}.json", json.dumps(result, indent=1) + "\n")
    write_atomic(args.out_dir / f"{name}.md", markdown(result))
    print(markdown(result))
    print(f"wrote {args.out_dir / name}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
