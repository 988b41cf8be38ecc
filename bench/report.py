"""Turns the files `pytest bench/ --benchmark-json=FILE` writes into bench/results/<op>-<device>.json,
.md and .png per suite (op: warp_aggregate, srt_e2e, dvt_fit, denoiser, stream): the device, versions and
commands, each row's time, peak memory and ratios to its group's reference (and floor), the targets
of bench/targets.py (docs/benchmarks.md) met or missed, also as data ("verdicts"), and a plot of time
and peak memory against views and size.

    python bench/report.py BENCH_JSON [BENCH_JSON ...] [--out DIR]

Rows merge into the results already in DIR by test id: a row measured again replaces the old one,
so a GPU grid can be measured over several commands.
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # fastsrt and bench from this checkout, not installed

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter, ScalarFormatter  # noqa: E402

from bench import harness  # noqa: E402
from bench.targets import BY_KEY, verdict  # noqa: E402

OPS = ("warp_aggregate", "srt_e2e", "dvt_fit", "denoiser", "stream")
PLOT_AXES = ("views", "size", "points", "batch")
CPU_NOTE = ("The targets are set for one H100/H200-class GPU at the target shapes (docs/benchmarks.md); "
            "these CPU numbers are for the record and get no verdict on the GPU targets.")


def read_rows(path: Path) -> dict[str, tuple[dict, list[dict]]]:
    """{op: (the run's facts, its rows)} from one --benchmark-json file."""
    data = json.loads(path.read_text())
    if "fastsrt" not in data:
        raise SystemExit(f"{path}: no 'fastsrt' block; was it written by `pytest bench/ --benchmark-json=...`?")
    run = {**data["fastsrt"], "datetime": data.get("datetime", "")}
    found: dict[str, tuple[dict, list[dict]]] = {}
    for bench in data["benchmarks"]:
        op = Path(bench["fullname"].split("::")[0]).stem.removeprefix("test_")
        stats = bench.get("stats") or {}
        if op not in OPS or "median" not in stats:
            continue
        row = {"name": bench["name"], "group": bench["group"], **bench["extra_info"], "run": run["datetime"],
               **{f"{key}_s": stats[key] for key in ("median", "mean", "min", "stddev")}, "rounds": stats["rounds"]}
        found.setdefault(op, (run, []))[1].append(row)
    return found


def per_image(row: dict) -> float:
    return row["median_s"] / row.get("images", 1)


def label(row: dict) -> str:
    parts = [row["impl"]]
    if row.get("dtype", "float32") != "float32":
        parts.append(row["dtype"])
    if row.get("variant"):
        parts.append(row["variant"])
    return " ".join(parts)


def add_ratios(rows: list[dict]) -> None:
    """x_reference: the group's baseline time per image / this row's; of_floor: the floor's images/s
    share this row reaches (its floor row: the same group and dtype)."""
    for row in rows:
        group = [r for r in rows if r["group"] == row["group"]]
        baseline = next((r for r in group if r.get("baseline")), None)
        ratio = baseline is not None and row is not baseline
        row["x_reference"] = round(per_image(baseline) / per_image(row), 3) if ratio else None
        floor = next((r for r in group if r["impl"] == row.get("floor") and r["dtype"] == row["dtype"]), None)
        row["of_floor"] = round(per_image(floor) / per_image(row), 3) if floor else None


def judge(found: list[dict], key: str, where: str, value: float, applies: bool) -> str:
    """Appends the verdict of target ``key`` on ``value`` to ``found``; returns its text for a report line."""
    found.append(verdict(key, where, value, applies))
    target = BY_KEY[key]
    return found[-1]["status"] if target.bound is None else f"target {target.bound_text()}: {found[-1]['status']}"


def find(rows: list[dict], **match) -> dict | None:
    return next((r for r in rows if all(r.get(k, r["shape"].get(k)) == v for k, v in match.items())), None)


def warp_aggregate_targets(rows: list[dict], on_gpu: bool, found: list[dict]) -> list[str]:
    views50 = [r for r in rows if r["shape"]["views"] == 50]
    if not views50:
        return ["no K=50 rows: not measured"]
    channels, size = max(r["shape"]["channels"] for r in views50), min(r["shape"]["size"] for r in views50)
    applies = on_gpu and (channels, size) == (768, 518)
    lines = []
    for reduce in ("mean", "median"):
        where = dict(views=50, channels=channels, size=size, reduce=reduce)
        text = f"{reduce}, K=50, C={channels}, {size}x{size}"
        reference = find(rows, baseline=True, **where)
        fast = find(rows, impl="fused", **where) or find(rows, impl="chunked", **where)
        if not (reference and fast):
            lines.append(f"{text}: reference or fast path not measured")
            continue
        speedup, where = fast["x_reference"], f"{fast['impl']}, {text}"
        fused = applies and fast["impl"] == "fused"  # a GPU run without its fused row gets no verdict
        lines.append(f"{text}: {fast['impl']} is {speedup:.1f}x the {reference['impl']} (fused "
                     f"{judge(found, 'warp_speedup', where, speedup, fused)})")
        if reduce == "mean":
            share = fast["gbps"] / fast["copy_gbps"]
            lines.append(f"{text}: {fast['impl']} reaches {100 * share:.0f}% of the copy bandwidth ({fast['gbps']:.3g} "
                         f"of {fast['copy_gbps']:.3g} GB/s; {judge(found, 'warp_bandwidth', where, share, fused)})")
        if fast["peak_mib"] is not None:
            need = (fast["peak_mib"] + fast["tokens_mib"]) / (fast["tokens_mib"] + fast["output_mib"])
            lines.append(f"{text}: {fast['impl']} peak is {need:.2f}x token grids + output "
                         f"({judge(found, 'warp_memory', where, need, fused)})")
        if not on_gpu and reference["impl"] == "reference" and fast["peak_mib"] and reference["peak_mib"]:
            memory = fast["peak_mib"] / reference["peak_mib"]
            lines.append(f"{text}: CPU, chunked is {speedup:.1f}x the reference "
                         f"({judge(found, 'warp_cpu_speed', where, speedup, True)}) with {memory:.3f} of its peak "
                         f"memory ({judge(found, 'warp_cpu_memory', where, memory, True)})")
    return lines


def tflops(row: dict, views: int = 50) -> float:
    """The row's counted matrix work over its median time, TFLOP/s."""
    return row.get("images", 1) * views * row["gflop_per_view"] / row["median_s"] / 1e3


def srt_e2e_targets(rows: list[dict], on_gpu: bool, found: list[dict]) -> list[str]:
    lines = []
    matmul = find(rows, impl="matmul")
    if matmul:
        rate = matmul["gflop"] / matmul["median_s"] / 1e3
        where = f"bf16 {matmul['shape']['n']}^3 matrix product"
        lines.append(f"the device's {where}: {rate:.4g} TFLOP/s ({judge(found, 'matmul_rate', where, rate, True)})")
    views = [r for r in rows if "model" in r["shape"]]
    for model, size, batch in sorted({(r["shape"]["model"], r["shape"]["size"], r["shape"]["batch"]) for r in views}):
        where = dict(model=model, size=size, views=50, batch=batch, dtype="bfloat16")
        text = f"{model}, {size}x{size}, K=50, B={batch}"
        fast = find(views, impl="fused", **where) or find(views, impl="chunked", **where)
        if not fast:
            continue
        applies, at = on_gpu and size == 518 and fast["impl"] == "fused", f"{fast['impl']}, {text}"
        if fast["x_reference"] is not None:
            lines.append(f"{text}: {fast['impl']} bf16 is {fast['x_reference']:.2f}x the authors' loop's images/s "
                         f"({judge(found, 'srt_speedup', at, fast['x_reference'], applies)})")
        floor = find(views, impl=fast["floor"], **where)
        if floor:
            line = (f"{text}: {fast['impl']} bf16 reaches {fast['of_floor']:.2f} of the {floor['impl']}'s images/s "
                    f"({judge(found, 'srt_floor', at, fast['of_floor'], applies)})")
            if fast["of_floor"] < 0.9:
                line += (f"; per image {1e3 * per_image(fast):.3g} ms, of which the bare forwards take "
                         f"{1e3 * per_image(floor):.3g} ms")
            lines.append(line)
            if matmul:
                share = tflops(floor) / rate
                at_floor = f"{floor['impl']}, {text}"
                lines.append(f"{text}: the {floor['impl']}'s view forwards run at {tflops(floor):.3g} TFLOP/s, "
                             f"{100 * share:.3g}% of the measured bf16 matrix rate "
                             f"({judge(found, 'forward_share', at_floor, share, True)})")
        if "vit_small" in model:
            images = batch / fast["median_s"]
            lines.append(f"{text}: ViT-S/14 {fast['impl']} {images:.3g} images/s ({tflops(fast):.3g} TFLOP/s; "
                         f"{judge(found, 'srt_vit_s_images', at, images, True)})")
    return lines or ["no K=50 bfloat16 rows: not measured"]


def dvt_fit_targets(rows: list[dict], on_gpu: bool, found: list[dict]) -> list[str]:
    lines = []
    for row in rows:
        if row["shape"].get("points") and row["impl"] == "extension" and row["x_reference"]:
            where = f"N={row['shape']['points']}"
            verdict_text = judge(found, "dvt_encoding", where, row["x_reference"], on_gpu)
            lines.append(f"encoding forward + backward, {where}: the extension is "
                         f"{row['x_reference']:.1f}x the torch encoding ({verdict_text})")
    features = [r for r in rows if r["impl"] == "backbone"]
    fits = [r for r in rows if r["impl"] == "extension" and "final_loss_image0" in r]
    if features and fits:
        best, fit = min(features, key=per_image), max(fits, key=lambda r: r["images"])
        total = per_image(best) + per_image(fit)
        shape = fit["shape"]
        paper = (shape["model"], shape["size"], shape["views"], shape["iterations"]) == (
            "vit_base_patch14_dinov2", 518, 769, 20000)
        setting = "the paper's setting" if paper else "a reduced setting"
        lines.append(f"per image at {setting}: {per_image(best):.3g} s "
                     f"features ({label(best)}) + {per_image(fit):.3g} s fit ({label(fit)}) = {total:.3g} s "
                     f"(at the paper's setting, {judge(found, 'dvt_seconds', setting, total, on_gpu and paper)})")
    for row in fits:
        if "loss_vs_reference" in row:
            gap = row["loss_vs_reference"]
            lines.append(f"final loss of image 0, {label(row)}: {100 * gap:+.2f}% of the torch reference path's "
                         f"({judge(found, 'dvt_loss', label(row), abs(gap), True)})")
    return lines or ["no rows: not measured"]


def denoiser_targets(rows: list[dict], on_gpu: bool, found: list[dict]) -> list[str]:
    lines = []
    for channels in sorted({r["shape"]["channels"] for r in rows if r["shape"]["kind"] == "denoiser"}):
        ones = [r for r in rows if r["shape"]["kind"] == "denoiser" and r["shape"]["channels"] == channels
                and r["shape"]["batch"] == 1]
        if not ones:
            continue
        best = min(ones, key=lambda r: r["median_s"])
        ms, speedup = 1e3 * best["median_s"], best["x_reference"] or 1.0
        where = f"C={channels}, {label(best)}"
        lines.append(f"denoiser C={channels}, 37x37, batch 1: best {label(best)} {ms:.3g} ms "
                     f"({judge(found, 'denoiser_latency', where, ms, on_gpu)}), {speedup:.2f}x eager fp32 "
                     f"({judge(found, 'denoiser_speedup', where, speedup, on_gpu)})")
    return lines or ["no batch-1 denoiser rows: not measured"]


def stream_targets(rows: list[dict], on_gpu: bool, found: list[dict]) -> list[str]:
    """Judged on any device: decoding a frame must hide behind the model's work on it."""
    lines = []
    for row in rows:
        if row["impl"] != "stream" or row["x_reference"] is None:
            continue
        where = row["group"].removeprefix("stream ")
        latency = ", ".join(f"{name} {ms:.4g} ms" for name, ms in row["latency_ms"].items())
        lines.append(f"{where}: the stream reaches {row['x_reference']:.2f} of the in-memory frames/s "
                     f"({judge(found, 'stream_share', where, row['x_reference'], True)}); latency {latency}; "
                     f"the loop waited on decoding {row['waited_s']:.3g} s of {row['stream_seconds']:.3g} s")
    return lines or ["no stream rows: not measured"]


def targets(op: str, rows: list[dict], on_gpu: bool) -> tuple[list[str], list[dict]]:
    """(the report's lines on the targets, the verdicts of bench/targets.py's targets)."""
    timed, found = [r for r in rows if r["median_s"]], []
    judged = {"warp_aggregate": warp_aggregate_targets, "srt_e2e": srt_e2e_targets, "dvt_fit": dvt_fit_targets,
              "denoiser": denoiser_targets, "stream": stream_targets}[op]
    return judged(timed, on_gpu, found), found


def seconds(value: float) -> str:
    return f"{value:.3g} s" if value >= 1 else f"{1e3 * value:.3g} ms"


def checks(row: dict) -> str:
    return ", ".join(f"{key} {row[key]}" for key in row if key.startswith(("rel_err", "loss_vs")))


def markdown(op: str, report: dict) -> str:
    runs = report["runs"]
    lines = [f"# {op} on {report['device']}", ""]
    if report["slug"] == "cpu":
        lines += [f"**{CPU_NOTE}**", ""]
    lines += [
        "## What is measured", "", report["measures"], "",
        "- versions: " + ", ".join(f"{name} {version}" for name, version in runs[-1]["versions"].items()),
        "- commands (load average 1/5/15 min at the start and the end; above the core count, other processes "
        "shared the CPU and times are noisy):",
        *[f"  - `{run['command']}` ({run['datetime']}; {run['threads']} torch threads; load "
          f"{run['load_average']['start']} -> {run['load_average']['end']})" for run in runs],
        "- time: the median over the timed rounds; each CUDA call ends with a synchronisation",
        f"- {harness.PEAK_MEMORY_NOTE}",
        "- x ref: the group's reference time per image over this row's; of floor: the share of its floor's "
        "images/s this row reaches",
        "", "## Results", "",
        "| group | path | ran | time | rounds | images/s | x ref | of floor | peak MiB | GB/s | check |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in report["rows"]:
        images = f"{1 / per_image(row):.3g}" if "images" in row else ""
        ratio = "" if row["x_reference"] is None else f"{row['x_reference']:.3g}"
        floor = "" if row["of_floor"] is None else f"{row['of_floor']:.2f}"
        peak = "" if row.get("peak_mib") is None else f"{row['peak_mib']:.0f}"
        gbps = f"{row['gbps']:.3g} ({100 * row['gbps'] / row['copy_gbps']:.0f}% of copy)" if "gbps" in row else ""
        lines.append(f"| {row['group']} | {label(row)} | {row.get('ran', '')} | {seconds(row['median_s'])} | "
                     f"{row['rounds']} | {images} | {ratio} | {floor} | {peak} | {gbps} | {checks(row)} |")
    lines += ["", "## Targets", ""] + [f"- {line}" for line in report["targets"]]
    lines += ["", f"![time and peak memory]({op}-{report['slug']}.png)", ""]
    return "\n".join(lines)


def slice_key(row: dict, axis: str) -> str:
    """The row's shape parameters other than ``axis``, as one comparable string."""
    return json.dumps({k: v for k, v in row["shape"].items() if k != axis}, sort_keys=True)


def plot(op: str, rows: list[dict], path: Path) -> bool:
    """Time and peak memory against each axis of PLOT_AXES that varies, one line per path (the
    reference dashed), on the slice of the other shape parameters that covers the most values of
    the axis. False where nothing varies."""
    panels = []
    for axis in PLOT_AXES:
        having = [r for r in rows if axis in r["shape"]]
        values = defaultdict(set)
        for row in having:
            values[slice_key(row, axis)].add(row["shape"][axis])
        order = list(values)  # more values of the axis first, then larger shapes, then the first seen
        chosen = max(order, key=lambda key: (len(values[key]), sum(v for v in json.loads(key).values()
                                                                    if isinstance(v, (int, float))), -order.index(key)),
                     default=None)
        if chosen is not None and len(values[chosen]) >= 2:
            panels.append((axis, chosen, [r for r in having if slice_key(r, axis) == chosen]))
    if not panels:
        return False
    figure, grid = plt.subplots(2, len(panels), figsize=(6 * len(panels), 8), squeeze=False)
    for column, (axis, chosen, picked) in enumerate(panels):
        for series in dict.fromkeys(label(r) for r in picked):
            points = sorted(((r["shape"][axis], r) for r in picked if label(r) == series), key=lambda p: p[0])
            style = dict(linestyle="--", color="black") if points[0][1].get("baseline") else {}
            grid[0][column].plot([x for x, _ in points], [1e3 * r["median_s"] for _, r in points], marker="o",
                                 label=series, **style)
            memory = [(x, r["peak_mib"]) for x, r in points if r.get("peak_mib")]
            if memory:
                grid[1][column].plot(*zip(*memory), marker="o", label=series, **style)
        fixed = ", ".join(f"{k}={v}" for k, v in json.loads(chosen).items())
        for axes, what in zip(grid[:, column], ("time per call (ms)", "peak memory (MiB)")):
            axes.set(xlabel=axis, ylabel=what, xscale="log", yscale="log")
            axes.set_xticks(sorted({r["shape"][axis] for r in picked}))
            axes.xaxis.set_major_formatter(ScalarFormatter())
            axes.xaxis.set_minor_formatter(NullFormatter())
            axes.set_title(f"{op}: {fixed}", fontsize=8)
            axes.legend(fontsize=7)
            axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    harness.save_figure(path, figure)
    plt.close(figure)
    return True


def measures(op: str) -> str:
    """What the suite measures: its test file's docstring."""
    return ast.get_docstring(ast.parse((ROOT / "bench" / f"test_{op}.py").read_text())) or ""


def write_report(op: str, run: dict, new_rows: list[dict], out: Path) -> Path:
    json_path = out / f"{op}-{run['slug']}.json"
    old = json.loads(json_path.read_text()) if json_path.exists() else {"rows": [], "runs": []}
    rows = harness.merge_rows(old["rows"], new_rows)
    runs = {r["datetime"]: r for r in [*old["runs"], run]}
    used = [runs[key] for key in sorted({row["run"] for row in rows})]
    add_ratios(rows)
    lines, verdicts = targets(op, rows, on_gpu=run["slug"] != "cpu")
    report = {"op": op, "device": run["device"], "slug": run["slug"], "measures": measures(op), "runs": used,
              "targets": lines, "verdicts": verdicts, "rows": rows}
    harness.save_text(json_path, json.dumps(report, indent=1) + "\n")
    harness.save_text(json_path.with_suffix(".md"), markdown(op, report))
    if not plot(op, [r for r in rows if r["median_s"]], json_path.with_suffix(".png")):
        print(f"{op}: no shape parameter varies, no plot")
    return json_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bench_json", nargs="+", type=Path, help="files written by pytest bench/ --benchmark-json=...")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    for path in args.bench_json:
        found = read_rows(path)
        if not found:
            print(f"{path}: no timed benchmarks (run without --benchmark-disable)")
        for op, (run, rows) in found.items():
            written = write_report(op, run, rows, args.out)
            print(f"{op}: {len(rows)} rows from {path} -> {written} (.md, .png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
