"""Benchmark of the DVT denoiser: latency (batch 1) and throughput (large batch) per backend, and the
ViT + denoiser end to end. Writes bench/results/denoiser-<device>.json and .md.

    python bench/denoiser.py                 # GPU: C 384/768, batch 1/32, every backend that runs
    python bench/denoiser.py --device cpu    # CPU: reduced settings (stated in the output)
    python bench/denoiser.py --backends tensorrt --channels 768 --kinds denoiser   # a part of a run

Each row runs in its own process and the results file is rewritten after every row, merged with
the rows already in it for the same device (a rerun row replaces the old one), so a long run can
be split into several commands (--backends, --kinds, --channels, --batches, --e2e-channels) and a
time limit keeps what is done. Memory (peak_mem_mb, the same on both devices): the peak while the
timed calls run minus what was in use before the backend was built (the module's eager weights,
the input and the eager reference output); it counts the runtime's own weights (the torch backend
runs a copy) and whatever the build left in place. GPU: torch.cuda.max_memory_allocated (torch's
allocator: TensorRT's and onnxruntime's own allocations do not show); CPU: the peak resident set
(VmHWM, reset after the build). Times: warm-up calls, then the median over repetitions of the
per-call time (on the GPU the mean over an inner loop of calls between two synchronisations).
Random weights throughout (no downloads); timings do not depend on the weights' values.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, fastsrt uninstalled

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

import fastsrt  # noqa: E402,F401  (before timm)

GRID = 37  # 518 px at patch 14, the paper's setting
MODELS = {384: "vit_small_patch14_dinov2.lvd142m", 768: "vit_base_patch14_dinov2.lvd142m"}
TARGET_MS, TARGET_SPEEDUP = 0.3, 5.0
KINDS = ("denoiser", "vit+denoiser")
BACKEND_NAMES = ("eager", "torch.compile", "torch.compile+cudagraph", "onnxruntime", "tensorrt")


def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS mark of this process (VmHWM); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def run_row(spec: dict) -> dict:
    """One row, in this process: build the runtime, check it against eager fp32, time it."""
    from fastsrt.backbone import load_timm_model
    from fastsrt.deploy import FixedSizePipeline, compile_module
    from fastsrt.dvt import Denoiser

    device = torch.device(spec["device"])
    torch.manual_seed(0)
    channels, batch = spec["channels"], spec["batch"]
    denoiser = Denoiser(channels, grid=(GRID, GRID), backbone=MODELS[channels]).eval()
    if spec["kind"] == "denoiser":
        module, shape = denoiser, (channels, GRID, GRID)
    else:
        model = load_timm_model(MODELS[channels], pretrained=False)
        module, shape = FixedSizePipeline(model, denoiser, GRID * 14), (3, GRID * 14, GRID * 14)
    module = module.to(device).eval().requires_grad_(False)
    inputs = torch.randn(batch, *shape, device=device)
    with torch.no_grad():
        reference = module(inputs)

    backend, precision = spec["backend"], spec["dtype"]
    options = {"eager": dict(backend="torch", compile=False, cuda_graph=False),
               "torch.compile": dict(backend="torch", compile=True, cuda_graph=False),
               "torch.compile+cudagraph": dict(backend="torch", compile=True, cuda_graph=True),
               "onnxruntime": dict(backend="onnxruntime"),
               "tensorrt": dict(backend="tensorrt")}[backend]
    cache = tempfile.mkdtemp(prefix="fastsrt-bench-")  # fresh: the build time is a real build
    if device.type == "cuda":  # the module's weights, the input and the reference are already there
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated() / 2**10
    else:
        before = rss_kib()
    start = time.perf_counter()
    try:
        compiled = compile_module(module, shape, batch, precision=precision, device=device, cache_dir=cache, **options)
        outputs = compiled(inputs)  # first call: compiles lazily where it does
        build_s = time.perf_counter() - start
        error = ((outputs.double() - reference.double()).norm() / reference.double().norm()).item()
        del outputs
        if device.type == "cuda":  # the peak while running, not while exporting or compiling
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            reset = reset_peak_rss()
        inner = spec["inner"] if device.type == "cuda" else 1
        for _ in range(spec["warmup"]):
            compiled(inputs)
        times = []
        for _ in range(spec["repeats"]):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(inner):
                compiled(inputs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) / inner)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    ms = sorted(times)[len(times) // 2] * 1000
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**10
    else:
        peak = peak_rss_kib() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # ru_maxrss: build too
    peak_mb = (peak - before) / 1024
    return {**{k: spec[k] for k in ("kind", "backend", "device", "channels", "batch", "dtype")}, "ms": round(ms, 4),
            "images_per_s": round(batch / ms * 1000, 2), "peak_mem_mb": round(peak_mb, 1), "build_s": round(build_s, 2),
            "rel_err_vs_eager_fp32": float(f"{error:.2e}")}


def plan(device: torch.device, args) -> tuple[list[dict], list[str]]:
    """The rows to run on this device, and notes on what was left out and why."""
    import importlib.util

    notes = []
    on_gpu = device.type == "cuda"
    backends = [("eager", "fp32"), ("eager", "bf16"), ("torch.compile", "fp32")]
    if on_gpu:
        backends += [("torch.compile+cudagraph", "fp32"), ("torch.compile+cudagraph", "bf16")]
    else:
        notes.append("CUDA graph rows need a GPU")
    ort_device = "cpu"
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        backends.append(("onnxruntime", "fp32"))
        if on_gpu and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            ort_device = "cuda"
        elif on_gpu:
            notes.append("onnxruntime rows run on the CPU: no CUDA execution provider here (onnxruntime-gpu not installed)")
    else:
        notes.append("onnxruntime is not installed")
    if on_gpu and importlib.util.find_spec("tensorrt") is not None:
        backends += [("tensorrt", "fp32"), ("tensorrt", "fp16"), ("tensorrt", "bf16")]
    else:
        notes.append("TensorRT rows: " + ("TensorRT is not installed (pip install tensorrt)" if on_gpu else "TensorRT needs a CUDA GPU"))
    common = {"warmup": args.warmup, "repeats": args.repeats, "inner": args.inner}

    def where(backend):
        return {"device": ort_device if backend == "onnxruntime" else str(device)}

    rows = [{**common, **where(b), "kind": "denoiser", "backend": b, "dtype": d, "channels": c, "batch": n}
            for c in args.channels for n in args.batches for b, d in backends]
    e2e_backends = [(b, d) for b, d in backends if on_gpu or b != "torch.compile"]
    if not on_gpu:
        notes.append("end to end on the CPU: no torch.compile row (minutes of compilation of the ViT on 2 cores)")
        notes.append("CPU peak memory counts what the build left resident (the torch.onnx exporter for onnxruntime "
                     "rows, inductor for torch.compile rows) on top of the runtime's own buffers")
    rows += [{**common, **where(b), "kind": "vit+denoiser", "backend": b, "dtype": d, "channels": c, "batch": 1}
             for c in args.e2e_channels for b, d in e2e_backends]
    rows = [r for r in rows if r["kind"] in args.kinds and (args.backends is None or r["backend"] in args.backends)]
    return rows, notes


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "CPU"
    return f"{model}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads"


def versions() -> dict:
    found = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("triton", "timm", "onnxruntime", "onnx", "tensorrt"):
        try:
            found[name] = __import__(name).__version__
        except Exception:  # not installed, or (triton) not importable on this machine
            found[name] = None
    return found


def targets(rows: list[dict]) -> dict:
    """The issue's GPU targets, per channel count: best batch-1 latency <= 0.3 ms and >= 5x eager fp32."""
    verdicts = {}
    for channels in sorted({r["channels"] for r in rows}):
        ones = [r for r in rows if r["kind"] == "denoiser" and r["channels"] == channels and r["batch"] == 1 and "ms" in r]
        eager = next((r for r in ones if r["backend"] == "eager" and r["dtype"] == "fp32"), None)
        if not ones or eager is None:
            continue
        best = min(ones, key=lambda r: r["ms"])
        speedup = eager["ms"] / best["ms"]
        verdicts[str(channels)] = {"best": f"{best['backend']} {best['dtype']}", "ms": best["ms"],
                                   "speedup_vs_eager_fp32": round(speedup, 2),
                                   "latency_met": best["ms"] <= TARGET_MS, "speedup_met": speedup >= TARGET_SPEEDUP}
    return verdicts


def markdown(result: dict) -> str:
    e2e = sorted({r["channels"] for r in result["rows"] if r["kind"] == "vit+denoiser"})
    lines = [f"# DVT denoiser benchmark: {result['device']}", "", "- rows merged from the runs (load average 1, 5, 15 min before/after):"]
    lines += [f"  - `{run['command']}`" + (f" ({run['load_average_before']} / {run.get('load_average_after')})"
                                           if "load_average_before" in run else "") for run in result["runs"]]
    lines += [f"- versions: {', '.join(f'{k} {v}' for k, v in result['versions'].items() if v)}",
              f"- shapes: tokens (B, C, {GRID}, {GRID}); end to end: images (B, 3, {GRID * 14}, {GRID * 14}) through "
              f"{', '.join(MODELS[c] for c in e2e) or '(none)'} (random weights) + denoiser",
              f"- settings: {result['settings']['note']}",
              "- peak MiB: the peak while the timed calls run beyond the eager module, input and output already in memory "
              "(both devices; see bench/denoiser.py)", ""]
    lines += ["| what | backend | device | dtype | C | batch | ms | images/s | peak MiB | build s | rel. err vs eager fp32 |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "ms" in r:
            lines.append(f"| {r['kind']} | {r['backend']} | {r['device']} | {r['dtype']} | {r['channels']} | {r['batch']} | {r['ms']:.3f} | "
                         f"{r['images_per_s']:.1f} | {r['peak_mem_mb']:.0f} | {r['build_s']:.1f} | {r['rel_err_vs_eager_fp32']:.1e} |")
        else:
            lines.append(f"| {r['kind']} | {r['backend']} | {r['device']} | {r['dtype']} | {r['channels']} | {r['batch']} | "
                         f"failed: {r['error']} | | | | |")
    lines += ["", "Notes:"] + [f"- {n}" for n in result["notes"]]
    if result["targets"]:
        lines += ["", "Targets (GPU: best batch-1 latency <= 0.3 ms and >= 5x eager fp32):"]
        for channels, t in result["targets"].items():
            lines.append(f"- C={channels}: best {t['best']} {t['ms']:.3f} ms, {t['speedup_vs_eager_fp32']}x eager fp32; "
                         f"latency target {'met' if t['latency_met'] else 'missed'}, speed-up target "
                         f"{'met' if t['speedup_met'] else 'missed'}")
    return "\n".join(lines) + "\n"


ROW_KEY = ("kind", "backend", "device", "channels", "batch", "dtype")


def load_previous(path: str, device: str) -> dict | None:
    """The results already in ``path`` if they were measured on ``device``, else None (a new file)."""
    try:
        with open(path) as f:
            previous = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return previous if previous.get("device") == device else None


def merged_rows(previous: list[dict], new: list[dict]) -> list[dict]:
    """The previous rows with those measured again replaced in place, then the new ones."""
    fresh = {tuple(r[k] for k in ROW_KEY): r for r in new}
    rows = [fresh.pop(tuple(r[k] for k in ROW_KEY), r) for r in previous]
    return rows + list(fresh.values())


def write(base: str, result: dict) -> None:
    """JSON and Markdown, each replaced atomically (a time limit never leaves half a file)."""
    from fastsrt.io import save_json, atomic_path

    save_json(base + ".json", result)
    with atomic_path(base + ".md") as temporary:
        temporary.write_text(markdown(result))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS, help="default: both")
    parser.add_argument("--backends", nargs="+", default=None, choices=BACKEND_NAMES, help="default: every one that runs here")
    parser.add_argument("--channels", type=int, nargs="+", default=[384, 768], choices=sorted(MODELS))
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="default: 1 32 (GPU), 1 4 (CPU)")
    parser.add_argument("--e2e-channels", type=int, nargs="*", default=[384, 768], choices=sorted(MODELS))
    parser.add_argument("--warmup", type=int, default=None, help="default: 20 (GPU), 2 (CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="default: 20 (GPU), 5 (CPU)")
    parser.add_argument("--inner", type=int, default=20, help="GPU calls per timed repetition (default: 20)")
    parser.add_argument("--row-timeout", type=float, default=None, help="seconds a row may take before it is recorded as failed")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row (JSON) and print its result
    args = parser.parse_args()
    if args.row:
        print("ROW " + json.dumps(run_row(json.loads(args.row))))
        return 0

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    args.batches = args.batches or ([1, 32] if on_gpu else [1, 4])
    args.warmup = args.warmup if args.warmup is not None else (20 if on_gpu else 2)
    args.repeats = args.repeats or (20 if on_gpu else 5)
    note = (f"{args.warmup} warm-up calls, median of {args.repeats} repetitions"
            + (f" of {args.inner} calls" if on_gpu else "")
            + ("" if on_gpu else "; REDUCED for the CPU: throughput at batch 4 instead of 32, end to end at batch 1"))
    specs, notes = plan(device, args)
    name = device_name(device)
    slug = "cpu" if not on_gpu else re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"denoiser-{slug}")
    previous = load_previous(base + ".json", name) or {}
    command = "python bench/denoiser.py " + " ".join(sys.argv[1:])
    run = {"command": command, "load_average_before": [round(v, 2) for v in os.getloadavg()]}
    runs = previous.get("runs", [{"command": previous["command"]}] if previous else []) + [run]
    notes = list(dict.fromkeys(previous.get("notes", []) + notes))  # this run's notes after the earlier ones, once each
    results = []

    def save() -> None:
        rows = merged_rows(previous.get("rows", []), results)
        run["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
        result = {"device": name, "torch": torch.__version__, "versions": versions(), "command": command, "runs": runs,
                  "settings": {"grid": [GRID, GRID], "warmup": args.warmup, "repeats": args.repeats,
                               "inner": args.inner if on_gpu else 1, "note": note},
                  "notes": notes + target_notes(rows, on_gpu), "rows": rows, "targets": targets(rows) if on_gpu else {}}
        write(base, result)

    for spec in specs:
        label = f"{spec['kind']:<13} {spec['backend']:<24} {spec['dtype']:<5} C={spec['channels']:<4} B={spec['batch']:<3}"
        try:
            done = subprocess.run([sys.executable, os.path.abspath(__file__), "--row", json.dumps(spec)],
                                  capture_output=True, text=True, timeout=args.row_timeout)
            line = next((l for l in done.stdout.splitlines() if l.startswith("ROW ")), None)
            message = None if done.returncode == 0 and line else (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
        except subprocess.TimeoutExpired:
            line, message = None, f"timed out after {args.row_timeout:g} s"
        if message is None:
            row = json.loads(line[4:])
            print(f"{label} {row['ms']:10.3f} ms {row['images_per_s']:10.1f} img/s  peak {row['peak_mem_mb']:8.0f} MiB  "
                  f"err {row['rel_err_vs_eager_fp32']:.1e}", flush=True)
        else:
            row = {k: spec[k] for k in ROW_KEY} | {"error": message}
            print(f"{label} failed: {message}", flush=True)
        results.append(row)
        save()  # after every row: a time limit or a crash keeps what is done
    if not specs:
        print("no rows selected (see --kinds, --backends, --channels)")
        return 1
    print(f"\nwrote {base}.json and {base}.md")
    return 0


def target_notes(rows: list[dict], on_gpu: bool) -> list[str]:
    """Why a GPU target was missed, per channel count."""
    notes = []
    for channels, t in (targets(rows) if on_gpu else {}).items():
        if t["latency_met"] and t["speedup_met"]:
            continue
        if "tensorrt" in t["best"]:
            notes.append(f"C={channels}: target missed even by TensorRT")
        else:
            ran = ", ".join(sorted({r["backend"] for r in rows if "ms" in r}))
            notes.append(f"C={channels}: target missed with the backends that could run here ({ran}); "
                         "TensorRT fp16, the backend meant for it, could not run (see above)")
    return notes


if __name__ == "__main__":
    sys.exit(main())
