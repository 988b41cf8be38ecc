"""SRT end to end: whole calls on a batch of images, the paper's settings (nearest, zero padding,
unmasked mean, pixel output, the paper's view grids), random weights. Per model, size, views K
and batch B, side by side:
    authors      the authors' style, float32 only: per image, views in mini-batches of 32
                 through fastsrt's Backbone, each view's tokens upsampled and inverse-shifted one
                 by one into a running sum; its output is what every other row is checked against
    reference    SRT(impl="reference"): every view materialised at pixel resolution
    chunked      SRT(impl="chunked"): shifted images through the Backbone, the chunked aggregation
                 (what impl="auto" runs on a CPU)
    fused        SRT(impl="fused", cuda_graph=True), GPU only: the shift + patch-embedding kernel,
                 timm's blocks, the fused aggregation
    floor        the K*B bare forwards alone: views shifted beforehand, model.forward_intermediates
                 (final norm, last block) on them, no input checks, no token copies, no aggregation
    floor_graph  GPU only: the same forwards captured once as a CUDA graph and replayed: the floor
                 of a fused row, which runs CUDA graphs
Every row but authors runs in float32 and in bfloat16 (autocast). All SRT rows and the floors pass
the same view batch: all K*B views at once on a GPU (what view_batch="auto" picks where they fit),
32 on a CPU (what "auto" picks there).
    matmul       the device's bf16 matrix rate: one N x N x N product of random bf16 matrices
                 (2 N^3 FLOP), N = MATMUL_N; the report gives the share of it the floors' view
                 forwards reach, their matrix work (gflop_per_view) over their time
"""
import contextlib
from dataclasses import dataclass
from functools import lru_cache
from itertools import product

import pytest
import torch
import torch.nn.functional as F

import fastsrt
from bench import harness
from bench.harness import DEVICE

CPU_SHAPES = dict(models=("vit_small_patch14_dinov2",), sizes=(28, 56), views=(10, 50), batches=(1,))
TARGET_SHAPES = dict(models=("vit_small_patch14_dinov2", "vit_base_patch14_dinov2"), sizes=(518,), views=(10, 50),
                     batches=(1, 8))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
IMPLS = ("authors", "reference", "chunked", "fused", "floor", "floor_graph")
GPU_ONLY = ("fused", "floor_graph")
VIEW_GRIDS = {10: 1, 50: 3}  # views -> the paper's shift radius d
AUTHORS_MINI_BATCH = 32
CPU_VIEW_BATCH = 32
# the reference aggregation holds about this many K x B x C x H x W float32 tensors
REFERENCE_COPIES = 3
MATMUL_N = {"cpu": 512, "target": 8192}  # CPU-sized, and large enough to fill an H100/H200
# relative, vs the float32 authors' loop (the parity tolerances of tests/test_backbone_fused.py)
TOLERANCES = {"float32": 1e-5, "bfloat16": 1e-2}


@dataclass(frozen=True)
class Case:
    model: str
    size: int
    views: int
    batch: int
    dtype: str
    impl: str

    @property
    def id(self) -> str:
        short = self.model.removesuffix("_patch14_dinov2")
        return f"{short}-{self.size}px-K{self.views}-B{self.batch}-{self.dtype}-{self.impl}"

    @property
    def group(self) -> str:
        return f"srt_e2e {self.model} {self.size}x{self.size} K={self.views} B={self.batch}"


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:  # the matmul row
        return
    shapes = TARGET_SHAPES if metafunc.config.getoption("target_shapes") else CPU_SHAPES
    cases = [Case(model, size, views, batch, dtype, impl)
             for model, size, views, batch, dtype, impl in product(shapes["models"], shapes["sizes"], shapes["views"],
                                                                   shapes["batches"], DTYPES, IMPLS)
             if impl != "authors" or dtype == "float32"]
    metafunc.parametrize("case", harness.params(cases, gpu_only=lambda case: case.impl in GPU_ONLY))


@lru_cache(maxsize=1)
def load_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return fastsrt.load_timm_model(name, pretrained=False).eval().to(DEVICE)


def make_images(batch: int, size: int) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(DEVICE)


def shift_zero(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out(y, x) = x(y - dy, x - dx), zero where that is outside."""
    out = torch.zeros_like(x)
    height, width = x.shape[-2:]
    out[..., max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)] = \
        x[..., max(-dy, 0) : height + min(-dy, 0), max(-dx, 0) : width + min(-dx, 0)]
    return out


@torch.no_grad()
def authors_loop(backbone: fastsrt.Backbone, images: torch.Tensor, shifts) -> torch.Tensor:
    """The authors' style: float32, per image, views in mini-batches, a running sum at pixel resolution."""
    patch = backbone.patch_size
    results = []
    for image in images.split(1):
        total = None
        for start in range(0, len(shifts), AUTHORS_MINI_BATCH):
            chunk = shifts[start : start + AUTHORS_MINI_BATCH]
            tokens = backbone(torch.cat([shift_zero(image, dy, dx) for dy, dx in chunk])).tokens[0]
            for view_tokens, (dy, dx) in zip(tokens.split(1), chunk):
                warped = shift_zero(F.interpolate(view_tokens, scale_factor=patch, mode="nearest"), -dy, -dx)
                total = warped if total is None else total + warped
        results.append(total / len(shifts))
    return torch.cat(results)


def autocast(dtype: str):
    """bfloat16 autocast (its cache off, as CUDA-graph capture needs), or nothing for float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(DEVICE.type, dtype=DTYPES[dtype], cache_enabled=False)


def floor_call(model: torch.nn.Module, images: torch.Tensor, shifts, dtype: str, view_batch: int, graph: bool):
    """The K*B bare forwards on views shifted here (outside the timing); as one CUDA graph if ``graph``."""
    views = torch.cat([shift_zero(images, dy, dx) for dy, dx in shifts])
    last = len(model.blocks) - 1

    @torch.no_grad()
    def bare():
        with autocast(dtype):
            for start in range(0, len(views), view_batch):
                model.forward_intermediates(views[start : start + view_batch], indices=[last], norm=True,
                                            stop_early=True, output_fmt="NCHW", intermediates_only=True)

    if not graph:
        return bare
    captured = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream(DEVICE)
    side.wait_stream(torch.cuda.current_stream(DEVICE))
    with torch.cuda.stream(side):  # warm-up (cuBLAS workspaces, lazy inits) outside the capture
        for _ in range(2):
            bare()
    torch.cuda.current_stream(DEVICE).wait_stream(side)
    with torch.cuda.graph(captured):
        bare()
    return captured.replay


_expected: dict[tuple, torch.Tensor] = {}  # the authors' output of the group being measured


def expected_output(case: Case, backbone: fastsrt.Backbone, images: torch.Tensor, shifts) -> torch.Tensor:
    key = (case.model, case.size, case.views, case.batch)
    if key not in _expected:
        _expected.clear()
        _expected[key] = authors_loop(backbone, images, shifts)
    return _expected[key]


def gflop_per_view(model: torch.nn.Module, size: int) -> float:
    """The backbone's matmul work on one view: per block 2 N C (3C + C + 2 hidden) for qkv, projection and
    MLP, and 4 N^2 C for attention, over N tokens (prefix included)."""
    tokens = (size // model.patch_embed.patch_size[0]) ** 2 + model.num_prefix_tokens
    channels, hidden = model.embed_dim, model.blocks[0].mlp.fc1.out_features
    per_block = 2 * tokens * channels * (4 * channels + 2 * hidden) + 4 * tokens**2 * channels
    return round(len(model.blocks) * per_block / 1e9, 3)


def test_srt_e2e(benchmark, case):
    benchmark.group = case.group
    model = load_model(case.model)
    backbone = fastsrt.Backbone(model)
    images = make_images(case.batch, case.size)
    shifts = fastsrt.paper_grid(VIEW_GRIDS[case.views])
    view_batch = case.views * case.batch if DEVICE.type == "cuda" else CPU_VIEW_BATCH
    info = dict(impl=case.impl, baseline=case.impl == "authors", dtype=case.dtype, images=case.batch,
                gflop_per_view=gflop_per_view(model, case.size),
                shape=dict(model=case.model, size=case.size, views=case.views, batch=case.batch))

    if case.impl == "authors":
        output = harness.measure(benchmark, lambda: lambda: authors_loop(backbone, images, shifts), ran="authors",
                                 **info)
        _expected.clear()
        _expected[(case.model, case.size, case.views, case.batch)] = output  # what the group's rows are checked against
        return
    if case.impl in ("floor", "floor_graph"):
        graph = case.impl == "floor_graph"
        harness.measure(benchmark, lambda: floor_call(model, images, shifts, case.dtype, view_batch, graph),
                        ran=case.impl, view_batch=view_batch, **info)
        return
    if case.impl == "reference":
        need = REFERENCE_COPIES * case.views * case.batch * model.embed_dim * case.size**2 * 4
        if need > 0.8 * harness.memory_bytes(DEVICE):
            pytest.skip(f"the reference aggregation needs ~{need / 2**30:.0f} GiB")
    expected = expected_output(case, backbone, images, shifts)

    def build():
        srt = fastsrt.SRT(backbone, shifts, impl=case.impl, dtype=DTYPES[case.dtype], view_batch=view_batch,
                          cuda_graph=case.impl == "fused")
        return lambda: srt.run(images)

    floor = "floor_graph" if case.impl == "fused" else "floor"  # the floor the report compares this row with
    output = harness.measure(benchmark, build, view_batch=view_batch, floor=floor, **info)
    benchmark.extra_info["ran"] = output.impl
    error = ((output.features.double() - expected.double()).norm() / expected.double().norm()).item()
    benchmark.extra_info["rel_err_vs_authors"] = float(f"{error:.2e}")
    assert output.features.shape == expected.shape and error <= TOLERANCES[case.dtype], error


def test_bf16_matmul_rate(benchmark, request):
    benchmark.group = "srt_e2e bf16 matrix rate"
    n = MATMUL_N["target" if request.config.getoption("target_shapes") else "cpu"]
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=generator).to(DEVICE, torch.bfloat16) for _ in range(2))  # never zeros
    output = harness.measure(benchmark, lambda: lambda: a @ b, impl="matmul", ran="torch.matmul", dtype="bfloat16",
                             gflop=2 * n**3 / 1e9, shape=dict(kind="matmul", n=n))
    expected = a[:64].double() @ b.double()
    error = ((output[:64].double() - expected).norm() / expected.norm()).item()
    benchmark.extra_info["rel_err_vs_float64"] = float(f"{error:.2e}")
    assert error <= TOLERANCES["bfloat16"], error
