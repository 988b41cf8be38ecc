"""pytest plugin of bench/gpu_check.py: keeps the tests that exercise a GPU path and records each
outcome as it happens, so a run stopped at its time limit still says what passed.

    python -m pytest -p bench.gpu_tests --gpu-tests-log=tests.jsonl tests/

Kept: every test marked ``requires_cuda`` (tests/utils.py; on the test or on one of its
parameters), and every test of a module that runs the Triton kernels (its source names ``triton``
or the ``"fused"`` paths: on a GPU they run compiled, on a CPU in Triton's interpreter).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

TRITON_MODULE = re.compile(r'\btriton\b|"fused"')
LOG: list[Path] = []  # the --gpu-tests-log file, once configured


def pytest_addoption(parser):
    parser.addoption("--gpu-tests-log", type=Path, help="append one JSON line per test outcome to this file")


def is_triton_module(path: Path, seen: dict[Path, bool]) -> bool:
    if path not in seen:
        seen[path] = bool(TRITON_MODULE.search(path.read_text()))
    return seen[path]


def pytest_collection_modifyitems(config, items):
    from utils import requires_cuda  # tests/utils.py, importable once tests/conftest.py is loaded

    seen: dict[Path, bool] = {}
    kept, dropped = [], []
    for item in items:
        cuda = any(mark == requires_cuda.mark for mark in item.iter_markers("skipif"))
        (kept if cuda or is_triton_module(Path(item.fspath), seen) else dropped).append(item)
    config.hook.pytest_deselected(items=dropped)
    items[:] = kept


def pytest_runtest_logreport(report):
    if not LOG:
        return
    # one line per test: its call, or the phase that failed or skipped before or after it
    if report.when == "call" or report.outcome != "passed":
        line = dict(test=report.nodeid, when=report.when, outcome=report.outcome,
                    seconds=round(report.duration, 3))
        if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
            line["reason"] = report.longrepr[2]
        elif report.outcome == "failed":
            line["error"] = str(report.longrepr).strip().splitlines()[-1][:300]
        with open(LOG[0], "a") as f:
            f.write(json.dumps(line) + "\n")


def pytest_configure(config):
    if config.getoption("gpu_tests_log"):
        LOG[:] = [config.getoption("gpu_tests_log")]
