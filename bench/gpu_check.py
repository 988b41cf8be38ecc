"""The GPU proof as one command (``bash scripts/gpu_check.sh [OUT]``): on the visible GPU, print the
environment, build the grid-encoding extension, run every CUDA and Triton test, run the benchmark
rows the targets need, write bench/results/<op>-<gpu>.json and .md, and print the targets met,
missed and not measured as the last lines.

    python -m bench.gpu_check [OUT] [--cpu] [--steps tests,srt_small] [--results DIR] [--deadline S]

Every step runs in its own process under its own time limit (its budget, and never past the
deadline), so a hang costs only that step; each step's output is saved as it finishes, and OUT
then holds ``gpu_check-<gpu>.tar.gz`` (bench/results/*-<gpu>.* and every step's log and raw data,
paths relative to the repository) and ``summary.md`` (the step and target tables), rewritten after
every step. Exit status 1 when a test failed or a step crashed; a missed target is a line in the
table. ``--cpu`` (or FASTSRT_GPU_CHECK=cpu): the same steps on the CPU at CPU-sized shapes, a few of
the tests, Triton in its interpreter, the GPU-only rows skipped, results into a temporary folder
(never over the committed bench/results/*-cpu.*).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import targets  # noqa: E402

DEADLINE_S = {"gpu": 525, "cpu": 480}  # the whole run; a GPU call has 10 minutes, 9 of them for this
RESERVE_S = 10  # kept back from the deadline for the tables and the archive
MIN_STEP_S = 15  # a step that would get less is skipped

ENV_CODE = r"""
import json, os, sys
import torch
from torch.utils import cpp_extension
from bench import harness
name, slug = harness.device_name()
facts = dict(device=name, slug=slug, python=sys.version.split()[0], versions=harness.versions(),
             torch_cuda=torch.version.cuda, cuda_home=cpp_extension.CUDA_HOME,
             torch_cuda_arch_list=os.environ.get("TORCH_CUDA_ARCH_LIST", ""), gpu=torch.cuda.is_available())
# what the steps need beyond torch: a missing one is named here, before the step it breaks
import importlib.util, shutil
facts["needs"] = {"ninja (extension build)": shutil.which("ninja") or "MISSING",
                  **{f"{name} ({step})": "found" if importlib.util.find_spec(name) else "MISSING"
                     for name, step in (("hypothesis", "tests"), ("matplotlib", "reports"), ("av", "stream"))}}
print("needs: " + ", ".join(f"{name}: {found}" for name, found in facts["needs"].items()), flush=True)
if facts["gpu"]:
    props = torch.cuda.get_device_properties(0)
    facts.update(capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                 memory_gib=round(props.total_memory / 2**30, 1))
print("FACTS " + json.dumps(facts))
"""
EXTENSION_CODE = r"""
import json, time
start = time.perf_counter()
from fastsrt.ops.grid_encoding.extension import load_extension
module = load_extension()
print("FACTS " + json.dumps(dict(seconds=round(time.perf_counter() - start, 1), cuda=bool(module.has_cuda()))))
"""


@dataclass(frozen=True)
class Bench:
    """Benchmark rows of one suite, run as one pytest process: test ids per mode (none: skipped there)."""

    suite: str  # bench/test_<suite>.py
    gpu: tuple[str, ...]  # at --target-shapes
    cpu: tuple[str, ...] = ()


def ids(function: str, *params: str) -> tuple[str, ...]:
    return tuple(f"{function}[{param}]" for param in params)


# the rows the targets of bench/targets.py need, in the order they run; the CPU rows are the cheapest
# that take the same code path
BENCHES = {
    "warp_aggregate": Bench(
        "warp_aggregate",
        ids("test_warp_aggregate", *(f"K50-C768-518px-{reduce}-{impl}" for reduce in ("mean", "median")
                                     for impl in ("reference", "reference_sliced", "fused"))),
        ids("test_warp_aggregate", *(f"K50-C32-112px-mean-{impl}" for impl in ("reference", "chunked", "fused")))),
    "srt_small": Bench(
        "srt_e2e",
        ("test_bf16_matmul_rate",) + ids("test_srt_e2e", "vit_small-518px-K50-B1-float32-authors",
                                         "vit_small-518px-K50-B1-bfloat16-fused",
                                         "vit_small-518px-K50-B1-bfloat16-floor_graph"),
        ("test_bf16_matmul_rate",) + ids("test_srt_e2e", "vit_small-28px-K10-B1-float32-authors",
                                         "vit_small-28px-K10-B1-float32-chunked",
                                         "vit_small-28px-K10-B1-float32-fused")),
    "srt_base": Bench(
        "srt_e2e",
        ids("test_srt_e2e", "vit_base-518px-K50-B1-float32-authors", "vit_base-518px-K50-B1-bfloat16-fused",
            "vit_base-518px-K50-B1-bfloat16-floor_graph")),
    "denoiser": Bench(
        "denoiser",
        ids("test_denoiser", *(f"denoiser-C768-B1-{run}" for run in ("eager-fp32", "eager-bf16",
                                                                     "compile+cudagraph-bf16", "tensorrt-fp16",
                                                                     "tensorrt-bf16"))),
        ids("test_denoiser", "denoiser-C384-B1-eager-fp32", "denoiser-C384-B1-compile+cudagraph-bf16")),
    "dvt_encoding": Bench(
        "dvt_fit",
        ids("test_dvt_fit", "encoding-N1048576-reference", "encoding-N1048576-extension"),
        ids("test_dvt_fit", "encoding-N4096-reference", "encoding-N4096-extension")),
    # needs PyAV (not on the benchmark machine's image: carry its wheel, docs/benchmarks.md); skipped without it
    "stream": Bench(
        "stream",
        ids("test_stream", *(f"vit_small-518px-K50-B{batch}-bfloat16-{impl}" for batch in (1, 8)
                             for impl in ("in-memory", "stream"))),
        ids("test_stream", "vit_small-28px-K10-B4-float32-in-memory", "vit_small-28px-K10-B4-float32-stream")),
    "dvt_fit": Bench(
        "dvt_fit",
        ids("test_dvt_fit", "features-bfloat16", "fit-8-per-fit-extension")),  # minutes on a CPU
}
# seconds per step on an H100/H200 (what each needs, with room), and on a CPU
BUDGETS = {"env": (30, 60), "extension": (180, 300), "tests": (170, 240), "warp_aggregate": (60, 120),
           "srt_small": (90, 120), "srt_base": (90, 60), "denoiser": (90, 120), "dvt_encoding": (45, 60),
           "stream": (60, 60), "dvt_fit": (600, 120)}
STEPS = tuple(BUDGETS)
# the CPU run's tests: those marked requires_cuda (skipped there) and two small interpreter runs
CPU_TESTS = "on_cuda or test_fused_patch_14_nearest_paper_settings or one_tiny_image"


@dataclass
class Outcome:
    step: str
    status: str  # "passed", "FAILED", "timed out", "skipped"
    seconds: float = 0.0
    note: str = ""
    facts: dict = field(default_factory=dict)

    @property
    def fails_the_run(self) -> bool:
        """A failed step, or a hang where everything must finish (the build, the tests)."""
        return self.status == "FAILED" or (self.status == "timed out" and self.step in ("extension", "tests"))


class Run:
    def __init__(self, out: Path, cpu: bool, results: Path | None, deadline: float):
        self.mode = "cpu" if cpu else "gpu"
        self.out = out
        self.work = Path(tempfile.mkdtemp(prefix="fastsrt-gpu-check-"))
        self.results = results or (self.work / "results" if cpu else ROOT / "bench" / "results")
        self.deadline = time.monotonic() + deadline
        self.outcomes: list[Outcome] = []
        self.slug, self.device = "unknown-device", "unknown device"
        self.environment = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
            PYTHONUNBUFFERED="1")
        if cpu:  # the CPU run stays on the CPU even where a GPU is visible
            self.environment.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")

    def budget(self, step: str) -> float:
        return min(BUDGETS[step][self.mode == "cpu"], self.deadline - time.monotonic() - RESERVE_S)

    def child(self, name: str, command: list[str], timeout: float) -> tuple[int | None, list[str]]:
        """Runs ``command`` in its own process group, its output to the console and WORK/<name>.log
        as it comes; (exit status or None when stopped at ``timeout``, its last lines)."""
        print(f"$ {' '.join(command)}  # at most {timeout:.0f} s", flush=True)
        tail: deque[str] = deque(maxlen=200)
        with open(self.work / f"{name}.log", "a") as log:
            process = subprocess.Popen(command, cwd=ROOT, env=self.environment, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)

            def pump():
                for line in process.stdout:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                    log.write(line)
                    log.flush()
                    tail.append(line.rstrip("\n"))

            reader = threading.Thread(target=pump, daemon=True)
            reader.start()
            try:
                status = process.wait(timeout)
            except subprocess.TimeoutExpired:
                stop(process)
                status = None
            reader.join(10)
        return status, list(tail)

    def facts(self, name: str, code: str, timeout: float) -> tuple[int | None, dict, list[str]]:
        """Runs Python ``code`` that prints one ``FACTS {json}`` line; (status, the facts, its last lines)."""
        status, tail = self.child(name, [python(), "-c", code], timeout)
        found = [json.loads(line[6:]) for line in tail if line.startswith("FACTS ")]
        return status, (found[-1] if found else {}), tail

    # the steps: each returns its Outcome

    def env(self, timeout: float) -> Outcome:
        status, facts, tail = self.facts("env", ENV_CODE, timeout)
        if status != 0 or not facts:
            return Outcome("env", "FAILED", note=last_line(tail, "torch does not import"))
        self.slug, self.device = facts["slug"], facts["device"]
        if self.mode == "gpu" and not facts["gpu"]:
            return Outcome("env", "FAILED", note="no CUDA GPU visible to torch (use --cpu for the CPU run)",
                           facts=facts)
        for name, command in (("nvidia-smi", ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                                              "clocks.sm,clocks.max.sm,temperature.gpu", "--format=csv"]),
                              ("nvcc", ["nvcc", "--version"])):
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=20)
                facts[name] = (done.stdout + done.stderr).strip()
            except (OSError, subprocess.TimeoutExpired) as error:
                facts[name] = f"not run: {error}"
            print(f"{name}: {facts[name]}", flush=True)
        (self.work / "env.json").write_text(json.dumps(facts, indent=1) + "\n")
        versions = ", ".join(f"{k} {v}" for k, v in facts["versions"].items())
        return Outcome("env", "passed", note=f"{self.device}; python {facts['python']}; {versions}", facts=facts)

    def extension(self, timeout: float) -> Outcome:
        status, facts, tail = self.facts("extension", EXTENSION_CODE, timeout)
        if status is None:
            return Outcome("extension", "timed out", note=f"stopped after {timeout:.0f} s")
        if status != 0 or not facts:
            return Outcome("extension", "FAILED", note=last_line(tail, "the build failed"))
        if self.mode == "gpu" and not facts["cuda"]:
            return Outcome("extension", "FAILED", note="built without its CUDA kernels", facts=facts)
        kind = "C++/CUDA" if facts["cuda"] else "C++ (CPU)"
        return Outcome("extension", "passed", note=f"{kind} extension loaded in {facts['seconds']} s "
                       "(built there unless it was in the build cache)", facts=facts)

    def tests(self, timeout: float) -> Outcome:
        log = self.work / "tests.jsonl"
        command = [python(), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "bench.gpu_tests",
                   f"--gpu-tests-log={log}", "tests"]
        if self.mode == "cpu":
            command += ["-k", CPU_TESTS]
        status, tail = self.child("tests", command, timeout)
        outcomes = Counter()
        if log.exists():
            for line in log.read_text().splitlines():
                outcomes[json.loads(line)["outcome"]] += 1
        counts = ", ".join(f"{count} {outcome}" for outcome, count in sorted(outcomes.items())) or "no test ran"
        facts = dict(outcomes)
        if status is None:
            return Outcome("tests", "timed out", note=f"stopped after {timeout:.0f} s; {counts} by then", facts=facts)
        if status != 0 or outcomes["failed"] or not outcomes:
            failed = [json.loads(line)["test"] for line in log.read_text().splitlines()
                      if '"failed"' in line] if log.exists() else []
            named = f"; failed: {', '.join(failed[:5])}" + (" ..." if len(failed) > 5 else "") if failed else ""
            return Outcome("tests", "FAILED", note=f"pytest exit {status}; {counts}{named}", facts=facts)
        return Outcome("tests", "passed", note=counts, facts=facts)

    def bench(self, step: str, timeout: float) -> Outcome:
        rows = getattr(BENCHES[step], self.mode)
        if not rows:
            return Outcome(step, "skipped", note=f"no {self.mode.upper()} rows: GPU only")
        raw = self.work / f"bench-{step}.json"
        suite = f"bench/test_{BENCHES[step].suite}.py"
        command = [python(), "-m", "pytest", "-q", "-p", "no:cacheprovider", *(f"{suite}::{row}" for row in rows),
                   f"--benchmark-json={raw}"] + (["--target-shapes"] if self.mode == "gpu" else [])
        status, tail = self.child(step, command, timeout)
        if status is None:
            return Outcome(step, "timed out", note=f"stopped at its budget, {timeout:.0f} s: rows not measured")
        reported = ""
        if raw.exists():
            from bench import report

            report.main([str(raw), "--out", str(self.results)])
            reported = f"-> {self.results}/{BENCHES[step].suite}-{self.slug}.json"
        if status != 0:
            return Outcome(step, "FAILED", note=f"pytest exit {status}: {last_line(tail, '')} {reported}")
        return Outcome(step, "passed", note=f"{len(rows)} rows {reported}")

    def run(self, steps: list[str]) -> int:
        started = time.monotonic()
        for step in steps:
            timeout = self.budget(step)
            print(f"\n=== gpu_check: {step} ({self.mode}) ===", flush=True)
            if step != "env" and self.outcomes[0].status != "passed":  # env runs first, always
                outcome = Outcome(step, "skipped", note="the environment step failed")
            elif timeout < MIN_STEP_S:
                outcome = Outcome(step, "skipped", note="no time left before the deadline")
            else:
                begun = time.monotonic()
                try:
                    outcome = getattr(self, step)(timeout) if step in ("env", "extension", "tests") else \
                        self.bench(step, timeout)
                except Exception as error:  # a crash of this script's own step code: recorded, the run goes on
                    import traceback

                    traceback.print_exc()
                    outcome = Outcome(step, "FAILED", note=f"{type(error).__name__}: {error}")
                outcome.seconds = round(time.monotonic() - begun, 1)
            self.outcomes.append(outcome)
            self.save(time.monotonic() - started)
        lines = self.save(time.monotonic() - started)
        print("\n" + "\n".join(lines), flush=True)
        return 1 if any(o.fails_the_run for o in self.outcomes) else 0

    def tables(self, seconds: float) -> list[str]:
        lines = [f"gpu_check on {self.device} ({self.mode} run, {seconds:.0f} s; results in {self.results}, "
                 f"everything in {self.out}/gpu_check-{self.slug}.tar.gz)", "",
                 "| step | status | seconds | note |", "|---|---|---:|---|"]
        lines += [f"| {o.step} | {o.status} | {o.seconds:.1f} | {o.note} |" for o in self.outcomes]
        why_not = {}  # suite -> its steps' statuses, shown beside a target without a value
        for outcome in self.outcomes:
            if outcome.step in BENCHES:
                status = outcome.status if outcome.status == "passed" else f"{outcome.status} ({outcome.note})"
                suite = BENCHES[outcome.step].suite
                why_not[suite] = "; ".join(filter(None, [why_not.get(suite), f"step {outcome.step} {status}"]))
        lines += ["", f"targets (bench/targets.py, docs/benchmarks.md) on {self.device}:",
                  "status          | target | measured"]
        return lines + targets.summary(self.results, self.slug, why_not)

    def save(self, seconds: float) -> list[str]:
        """Writes the tables and the archive into OUT (each replaced whole); returns the tables."""
        lines = self.tables(seconds)
        (self.work / "summary.md").write_text("\n".join(lines) + "\n")
        (self.work / "steps.json").write_text(json.dumps([o.__dict__ for o in self.outcomes], indent=1) + "\n")
        self.out.mkdir(parents=True, exist_ok=True)
        replace(self.out / "summary.md", lambda path: path.write_text("\n".join(lines) + "\n"))
        replace(self.out / f"gpu_check-{self.slug}.tar.gz", self.archive)
        return lines

    def archive(self, path: Path) -> None:
        with tarfile.open(path, "w:gz") as tar:
            for file in sorted(self.results.glob(f"*-{self.slug}.*")):
                tar.add(file, arcname=f"bench/results/{file.name}")
            for file in sorted(self.work.glob("*.*")):
                tar.add(file, arcname=f"gpu_check-{self.slug}/{file.name}")


def python() -> str:
    return sys.executable


def last_line(tail: list[str], default: str) -> str:
    return next((line.strip() for line in reversed(tail) if line.strip()), default)[:300]


def stop(process: subprocess.Popen) -> None:
    """Ends the process group ``process`` leads: SIGTERM, then SIGKILL after 5 s."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
            process.wait(wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def replace(path: Path, write) -> None:
    """``write(temporary)`` beside ``path``, then renamed over it: a reader never sees half a file."""
    temporary = path.with_name(f".{path.name}.tmp")
    write(temporary)
    os.replace(temporary, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", type=Path, default=ROOT / "gpu_check_out",
                        help="folder for summary.md and gpu_check-<gpu>.tar.gz (default: gpu_check_out)")
    parser.add_argument("--cpu", action="store_true", default=os.environ.get("FASTSRT_GPU_CHECK") == "cpu",
                        help="the CPU run: CPU-sized shapes, a few tests, results in a temporary folder")
    parser.add_argument("--steps", default=",".join(STEPS),
                        help=f"comma-separated steps to run, in this order: {','.join(STEPS)} (env always runs)")
    parser.add_argument("--results", type=Path, help="where the reports go (default: bench/results; --cpu: temporary)")
    parser.add_argument("--deadline", type=float, help="seconds for the whole run (default: 525; --cpu: 480)")
    args = parser.parse_args(argv)
    steps = [step.strip() for step in args.steps.split(",") if step.strip()]
    unknown = [step for step in steps if step not in STEPS]
    if unknown:
        parser.error(f"unknown step(s) {', '.join(unknown)}; choose from {', '.join(STEPS)}")
    steps = ["env"] + [step for step in STEPS if step in steps and step != "env"]
    mode = "cpu" if args.cpu else "gpu"
    run = Run(args.out.resolve(), args.cpu, args.results, args.deadline or DEADLINE_S[mode])
    print(f"gpu_check: {mode} run of {', '.join(steps)}; work folder {run.work}", flush=True)
    return run.run(steps)


if __name__ == "__main__":
    sys.exit(main())
