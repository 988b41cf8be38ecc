"""warp_aggregate, the inverse-warp upsample + mean/median over views (patch 14, nearest, zero
fill, pixel output, float32, one image): the reference beside the chunked torch path and the
fused Triton kernels (GPU only), on the same random token grids and the paper's view grids.

Where the reference's estimated need (REFERENCE_COPIES x K x C x H x W float32) exceeds the
device's memory it is skipped and "reference_sliced" stands in: the same reference over slices of
at most SLICE_CHANNELS channels, one call each, into one output. The reference is linear in C, so
that is its time given the memory. Each fast path's output is checked against the reference on
its first CHECK_CHANNELS channels. gbps: the minimum traffic (token grids read once, output
written once) / median time; copy_gbps: the device's copy bandwidth for comparison.
"""
from dataclasses import dataclass
from itertools import product

import pytest
import torch

import fastsrt
from bench import harness
from bench.harness import DEVICE
from fastsrt.ops.warp_aggregate import warp_aggregate

PATCH = 14
VIEW_GRIDS = {10: 1, 50: 3}  # views -> the paper's shift radius d (1 + (2d+1)^2 views)
CPU_SHAPES = dict(views=(10, 50), channels=(32,), sizes=(112, 224), reduces=("mean", "median"))
TARGET_SHAPES = dict(views=(10, 50), channels=(384, 768), sizes=(518, 1036), reduces=("mean", "median"))
IMPLS = ("reference", "reference_sliced", "chunked", "fused")
# a reference call peaks at about this many K x C x H x W float32 tensors (measured on a CPU: 2.9
# for the mean, 6.7 for the median with its sorted values and int64 indices)
REFERENCE_COPIES = 7
SLICE_CHANNELS = 64
CHECK_CHANNELS = 8


@dataclass(frozen=True)
class Case:
    views: int
    channels: int
    size: int
    reduce: str
    impl: str

    @property
    def id(self) -> str:
        return f"K{self.views}-C{self.channels}-{self.size}px-{self.reduce}-{self.impl}"

    @property
    def group(self) -> str:
        return f"warp_aggregate K={self.views} C={self.channels} {self.size}x{self.size} {self.reduce}"


def pytest_generate_tests(metafunc):
    shapes = TARGET_SHAPES if metafunc.config.getoption("target_shapes") else CPU_SHAPES
    cases = [Case(views, channels, size, reduce, impl)
             for views, channels, size, reduce, impl in product(shapes["views"], shapes["channels"], shapes["sizes"],
                                                                shapes["reduces"], IMPLS)
             if impl != "reference_sliced" or channels > SLICE_CHANNELS]
    metafunc.parametrize("case", harness.params(cases, gpu_only=lambda case: case.impl == "fused"))


@pytest.fixture(scope="module")
def copy_gbps() -> float:
    return harness.copy_bandwidth(DEVICE)


def reference_bytes(views: int, channels: int, size: int) -> int:
    return REFERENCE_COPIES * views * channels * size * size * 4


def sliced_reference(tokens: torch.Tensor, shifts, reduce: str, step: int) -> torch.Tensor:
    """The reference over channel slices of ``step``, written into one output."""
    views, batch, channels, h, w = tokens.shape
    output = torch.empty(batch, channels, h * PATCH, w * PATCH, device=tokens.device)
    for start in range(0, channels, step):
        output[:, start : start + step] = warp_aggregate(tokens[:, :, start : start + step], shifts, PATCH,
                                                         reduce=reduce, impl="reference")[0]
    return output


def check_matches_reference(output: torch.Tensor, tokens: torch.Tensor, shifts, reduce: str) -> None:
    """The fast path's first CHECK_CHANNELS channels against the reference on them (the parity
    tolerances of tests/test_warp_aggregate.py)."""
    expected = warp_aggregate(tokens[:, :, :CHECK_CHANNELS], shifts, PATCH, reduce=reduce, impl="reference")[0]
    actual = output[:, :CHECK_CHANNELS]
    assert actual.shape == expected.shape and torch.isfinite(actual).all()
    if reduce == "median":  # a selection: each element is one of the same values
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    else:
        assert ((actual.double() - expected.double()).norm() / expected.double().norm()).item() <= 1e-5


def test_warp_aggregate(benchmark, case, copy_gbps):
    benchmark.group = case.group
    need, memory = reference_bytes(case.views, case.channels, case.size), harness.memory_bytes(DEVICE)
    fits = need <= 0.8 * memory
    if case.impl == "reference" and not fits:
        pytest.skip(f"the reference needs ~{need / 2**30:.0f} GiB of {memory / 2**30:.0f} GiB: "
                    "reference_sliced stands in")
    if case.impl == "reference_sliced" and fits:
        pytest.skip("the full reference fits here: its row is the reference")
    shifts = fastsrt.paper_grid(VIEW_GRIDS[case.views])
    grid = case.size // PATCH
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(case.views, 1, case.channels, grid, grid, generator=generator).to(DEVICE)
    output_bytes = case.channels * case.size * case.size * 4
    info = dict(impl=case.impl, baseline=case.impl.startswith("reference"), dtype="float32", copy_gbps=copy_gbps,
                shape=dict(views=case.views, channels=case.channels, size=case.size, reduce=case.reduce),
                tokens_mib=round(tokens.numel() * 4 / 2**20, 2), output_mib=round(output_bytes / 2**20, 2))

    if case.impl == "reference_sliced":
        step = min(case.channels, SLICE_CHANNELS)
        while step > 1 and reference_bytes(case.views, step, case.size) > 0.8 * memory:
            step //= 2
        harness.measure(benchmark, lambda: lambda: sliced_reference(tokens, shifts, case.reduce, step),
                        bytes_moved=tokens.numel() * 4 + output_bytes, ran="reference",
                        note=f"the reference over slices of {step} channels", **info)
        return

    def build():
        return lambda: warp_aggregate(tokens, shifts, PATCH, reduce=case.reduce, impl=case.impl)

    result, _, ran = harness.measure(benchmark, build, bytes_moved=tokens.numel() * 4 + output_bytes, **info)
    benchmark.extra_info["ran"] = ran
    assert ran == case.impl, f"asked for {case.impl}, ran {ran}"
    if case.impl != "reference":
        check_matches_reference(result, tokens, shifts, case.reduce)
