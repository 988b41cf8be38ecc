"""Settings of the benchmark suites: fastsrt from this checkout (no install needed), Triton's
interpreter without a GPU, float32 that is float32 on GPUs, the --target-shapes option, and what the
run was (device, versions, command, load average) in the file --benchmark-json writes."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# Triton kernels run on a machine without a GPU only in the interpreter, which must be chosen
# before any kernel is defined (docs/traps.md)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# float32 rows compute in float32: cuDNN and cuBLAS would otherwise round inputs to TF32
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

import fastsrt  # noqa: E402,F401  (makes torchvision, hence timm, importable on a CPU-only torch)
from bench import harness  # noqa: E402

LOAD_AT_START: list[float] = []


def pytest_addoption(parser):
    parser.addoption("--target-shapes", action="store_true",
                     help="benchmark at the target shapes of docs/benchmarks.md (meant for an H100/H200) "
                          "instead of the CPU-sized defaults")


def pytest_sessionstart(session):
    LOAD_AT_START[:] = harness.load_average()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    name, slug = harness.device_name()
    output_json["fastsrt"] = {
        "device": name,
        "slug": slug,
        "threads": torch.get_num_threads(),
        "versions": harness.versions(),
        "command": harness.command_line(config.invocation_params.args),
        "target_shapes": config.getoption("target_shapes"),
        "load_average": {"start": LOAD_AT_START, "end": harness.load_average()},
    }
