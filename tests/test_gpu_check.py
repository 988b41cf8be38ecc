"""scripts/gpu_check.sh, the GPU proof in one command: its CPU run end to end (what it writes, its
last lines, the committed CPU results untouched), the targets judged from data, the benchmark rows
and tests it selects for a GPU run."""
import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ from this checkout

from bench import gpu_check, report, targets  # noqa: E402


def digests(paths) -> dict[str, str]:
    return {str(path): hashlib.sha256(path.read_bytes()).hexdigest() for path in paths}


def test_cpu_run_writes_its_results_and_ends_with_the_targets_table(tmp_path):
    committed = digests(sorted((ROOT / "bench" / "results").glob("*-cpu.*")))
    out = tmp_path / "out"
    environment = dict(os.environ, PYTHON=sys.executable, FASTSRT_GPU_CHECK="cpu")
    done = subprocess.run(["bash", "scripts/gpu_check.sh", str(out)], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert digests(map(Path, committed)) == committed  # the committed CPU results are not overwritten

    log = (out / "gpu_check.log").read_text()
    assert log.strip().endswith(done.stdout.strip().splitlines()[-1])  # the full log is the console's
    table = [line for line in done.stdout.strip().splitlines() if " | " in line][-len(targets.TARGETS):]
    assert [line.split(" | ")[1] for line in table] == [
        t.goal + (f" {t.bound_text()}" if t.bound is not None else "") for t in targets.TARGETS]
    statuses = {line.split(" | ")[1].split(" >=")[0].split(" <=")[0]: line.split(" | ")[0].strip() for line in table}
    assert statuses["CPU: warp_aggregate chunked vs the reference"] in ("met", "MISSED")  # judged on a CPU
    assert statuses["grid encoding fwd + bwd: the extension vs torch"] == "no verdict here"  # a GPU target
    assert statuses["record: the device's measured bf16 matrix rate"] == "recorded"
    assert (out / "summary.md").read_text().strip().splitlines()[-len(table):] == table

    with tarfile.open(out / "gpu_check-cpu.tar.gz") as archive:
        names = archive.getnames()
        for op in ("warp_aggregate", "srt_e2e", "denoiser", "dvt_fit"):
            written = json.load(archive.extractfile(f"bench/results/{op}-cpu.json"))
            assert written["rows"] and written["verdicts"] and written["slug"] == "cpu"
            assert archive.extractfile(f"bench/results/{op}-cpu.md").read().decode().startswith(f"# {op} on CPU")
        steps = json.load(archive.extractfile("gpu_check-cpu/steps.json"))
        tests = [json.loads(line) for line in archive.extractfile("gpu_check-cpu/tests.jsonl").read().splitlines()]
    assert [step["step"] for step in steps] == list(gpu_check.STEPS)
    assert {step["step"]: step["status"] for step in steps}["srt_base"] == "skipped"  # GPU-only rows
    assert {f"gpu_check-cpu/{name}" for name in ("env.json", "tests.log", "bench-warp_aggregate.json")} <= set(names)
    assert {t["outcome"] for t in tests} == {"passed", "skipped"} and any("CUDA" in t.get("reason", "") for t in tests)


def write_benchmark_json(path: Path, device: str, rows: list[tuple[str, str, float, dict]]) -> None:
    """A --benchmark-json file as bench/conftest.py writes it: (suite, name, median seconds, extra_info) rows."""
    benchmarks = [dict(fullname=f"bench/test_{suite}.py::test_{suite}[{name}]", name=name, group=info.pop("group"),
                       extra_info=info, stats=dict(median=median, mean=median, min=median, stddev=0.0, rounds=5))
                  for suite, name, median, info in rows]
    run = dict(device=device, slug=device.lower().replace(" ", "-"), threads=1, versions={}, command="pytest bench",
               target_shapes=True, load_average=dict(start=[0, 0, 0], end=[0, 0, 0]))
    path.write_text(json.dumps(dict(datetime="2026-01-01T00:00:00", benchmarks=benchmarks, fastsrt=run)))


def test_targets_are_judged_from_the_results_data(tmp_path):
    warp = dict(group="warp", views=50, channels=768, size=518, reduce="mean")
    warp_info = lambda impl, **more: dict(group="warp", impl=impl, dtype="float32", copy_gbps=4000.0, tokens_mib=200.0,
                                          output_mib=800.0, peak_mib=900.0, baseline=impl == "reference_sliced",
                                          shape={k: v for k, v in warp.items() if k != "group"}, **more)
    srt = dict(model="vit_small_patch14_dinov2", size=518, views=50, batch=1)
    srt_info = lambda impl, dtype, **more: dict(group="srt", impl=impl, dtype=dtype, images=1, gflop_per_view=93.0,
                                                baseline=impl == "authors", shape=srt, **more)
    denoiser = dict(kind="denoiser", channels=768, batch=1)
    rows = [
        ("warp_aggregate", "ref", 1.0, warp_info("reference_sliced", gbps=1.0)),
        ("warp_aggregate", "fused", 0.04, warp_info("fused", gbps=2000.0)),  # 25x: met; 50% of copy: missed
        ("srt_e2e", "matmul", 0.002, dict(group="mm", impl="matmul", dtype="bfloat16", gflop=1000.0,
                                          shape=dict(kind="matmul", n=8192))),  # 500 TFLOP/s
        ("srt_e2e", "authors", 2.0, srt_info("authors", "float32")),
        ("srt_e2e", "fused", 0.1, srt_info("fused", "bfloat16", floor="floor_graph")),  # 20x: met
        ("srt_e2e", "floor", 0.093, srt_info("floor_graph", "bfloat16")),  # 50 * 93 GFLOP in 93 ms: 50 TFLOP/s
        ("denoiser", "eager", 1e-3, dict(group="den", impl="eager", dtype="float32", baseline=True, shape=denoiser)),
        ("denoiser", "graph", 0.25e-3, dict(group="den", impl="compile+cudagraph", dtype="bfloat16", shape=denoiser)),
    ]
    bench_json = tmp_path / "bench.json"
    write_benchmark_json(bench_json, "NVIDIA H200", rows)
    assert report.main([str(bench_json), "--out", str(tmp_path)]) == 0
    lines = {line.split(" | ")[1].split(" >=")[0].split(" <=")[0]: line.split(" | ")
             for line in targets.summary(tmp_path, "nvidia-h200", {"dvt_fit": "step dvt_fit timed out"})}
    status = {goal: parts[0].strip() for goal, parts in lines.items()}
    assert status["warp_aggregate fused vs the reference (K=50, C=768, 518^2, mean, median)"] == "met"
    assert status["warp_aggregate fused mean: share of the copy bandwidth"] == "MISSED"
    assert status["warp_aggregate fused peak memory / (token grids + output)"] == "met"  # (900 + 200) / 1000
    assert status["SRT fused bf16 vs the authors' fp32 loop (K=50, 518^2)"] == "met"
    assert status["SRT fused bf16: share of the bare-forward floor's images/s"] == "met"  # 0.93
    assert status["denoiser batch 1, 37x37: best latency"] == "met"
    assert status["denoiser batch 1, 37x37: best vs eager fp32"] == "MISSED"  # 4x
    assert status["DVT stage 1 per image, features + fit (paper's setting)"] == "not measured"
    assert lines["DVT stage 1 per image, features + fit (paper's setting)"][2] == "step dvt_fit timed out"
    assert not any(goal.startswith("CPU:") for goal in status)  # CPU targets are left out of a GPU's table
    verdicts = {v["target"]: v for v in json.loads((tmp_path / "srt_e2e-nvidia-h200.json").read_text())["verdicts"]}
    assert verdicts["matmul_rate"]["value"] == pytest.approx(500.0)
    assert verdicts["forward_share"]["value"] == pytest.approx(50.0 / 500.0)
    assert verdicts["srt_vit_s_images"]["value"] == pytest.approx(10.0)
    assert lines["record: view forwards' share of the measured bf16 matrix rate"][2].startswith("10%")


def collected(*args: str) -> set[str]:
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    return {line.strip() for line in done.stdout.splitlines() if "::" in line}


def test_every_benchmark_row_of_a_gpu_run_exists_at_the_target_shapes():
    found = collected("--target-shapes", "bench")
    wanted = {f"bench/test_{bench.suite}.py::{row}" for bench in gpu_check.BENCHES.values() for row in bench.gpu}
    assert wanted - found == set()


def test_the_gpu_tests_are_every_cuda_test_and_every_triton_module():
    kept = collected("-p", "bench.gpu_tests", "tests")
    everything = collected("tests")
    assert kept < everything
    for path in (ROOT / "tests").glob("test_*.py"):
        module = {test for test in everything if test.startswith(f"tests/{path.name}::")}
        if gpu_check_triton_module(path):
            assert module <= kept, path.name
    cuda = {"tests/test_dvt_encoding.py::test_cuda_autograd_function_float64_gradcheck",
            "tests/test_dvt_decompose.py::test_extension_and_reference_fit_the_same[cuda]",
            "tests/test_deploy.py::test_torch_backend_cuda_graph_matches_eager"}
    assert cuda <= kept
    assert "tests/test_dvt_decompose.py::test_extension_and_reference_fit_the_same[cpu]" not in kept
    assert not any(test.startswith(("tests/test_cli.py", "tests/test_faults.py")) for test in kept)


def gpu_check_triton_module(path: Path) -> bool:
    from bench.gpu_tests import TRITON_MODULE

    return bool(TRITON_MODULE.search(path.read_text()))
