"""The DVT denoiser (one ViT block + positional embedding, random weights) per deployment backend,
and the ViT + denoiser pipeline, on the same random inputs: eager float32 (the reference) beside
eager bfloat16, torch.compile, torch.compile + CUDA graph (GPU), ONNX Runtime and TensorRT (GPU,
where installed). Each backend's output is checked against eager float32 within its precision's
tolerance. Every row builds into a fresh cache directory, so build_s is a real build.
    denoiser       tokens (B, C, 37, 37), the paper's grid (518 px at patch 14)
    vit+denoiser   images (B, 3, S, S) through a ViT and the denoiser at S / 14
"""
import importlib.util
from dataclasses import dataclass

import pytest
import torch

import fastsrt
from bench import harness
from bench.harness import DEVICE
from fastsrt import deploy
from fastsrt.dvt import Denoiser
from fastsrt.errors import Unavailable

GRID = 37
CPU_SHAPES = dict(channels=(384,), batches=(1, 4), pipelines=(("vit_small_patch14_dinov2", 224),))
TARGET_SHAPES = dict(channels=(384, 768), batches=(1, 32),
                     pipelines=(("vit_small_patch14_dinov2", 518), ("vit_base_patch14_dinov2", 518)))
MODEL_CHANNELS = {"vit_small_patch14_dinov2": 384, "vit_base_patch14_dinov2": 768}
# label -> (backend, precision, torch options, GPU only)
BACKENDS = {
    "eager-fp32": ("torch", "fp32", dict(compile=False, cuda_graph=False), False),
    "eager-bf16": ("torch", "bf16", dict(compile=False, cuda_graph=False), False),
    "compile-fp32": ("torch", "fp32", dict(compile=True, cuda_graph=False), False),
    "compile+cudagraph-fp32": ("torch", "fp32", dict(compile=True, cuda_graph=True), True),
    "compile+cudagraph-bf16": ("torch", "bf16", dict(compile=True, cuda_graph=True), True),
    "onnxruntime-fp32": ("onnxruntime", "fp32", {}, False),
    "tensorrt-fp32": ("tensorrt", "fp32", {}, True),
    "tensorrt-fp16": ("tensorrt", "fp16", {}, True),
    "tensorrt-bf16": ("tensorrt", "bf16", {}, True),
}
TOLERANCES = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 3e-2}  # relative, vs eager float32 (tests/test_deploy.py)
TENSORRT_FP32_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Case:
    kind: str  # "denoiser" or "vit+denoiser"
    channels: int
    batch: int
    backend: str  # a key of BACKENDS
    model: str = ""  # vit+denoiser
    size: int = 0  # vit+denoiser: image side

    @property
    def id(self) -> str:
        if self.kind == "denoiser":
            return f"denoiser-C{self.channels}-B{self.batch}-{self.backend}"
        return f"vit+denoiser-{self.model.removesuffix('_patch14_dinov2')}-{self.size}px-B{self.batch}-{self.backend}"

    @property
    def group(self) -> str:
        if self.kind == "denoiser":
            return f"denoiser C={self.channels} {GRID}x{GRID} B={self.batch}"
        return f"vit+denoiser {self.model} {self.size}x{self.size} B={self.batch}"

    @property
    def gpu_only(self) -> bool:
        # compiling a whole ViT takes minutes on a CPU
        return BACKENDS[self.backend][3] or (self.kind == "vit+denoiser" and self.backend.startswith("compile"))


def pytest_generate_tests(metafunc):
    shapes = TARGET_SHAPES if metafunc.config.getoption("target_shapes") else CPU_SHAPES
    cases = [Case("denoiser", channels, batch, backend)
             for channels in shapes["channels"] for batch in shapes["batches"] for backend in BACKENDS]
    cases += [Case("vit+denoiser", MODEL_CHANNELS[model], 1, backend, model, size)
              for model, size in shapes["pipelines"] for backend in BACKENDS]
    metafunc.parametrize("case", harness.params(cases, gpu_only=lambda case: case.gpu_only))


def skip_if_missing(backend: str) -> None:
    if backend == "tensorrt" and importlib.util.find_spec("tensorrt") is None:
        pytest.skip("TensorRT is not installed")
    if backend == "onnxruntime":
        if importlib.util.find_spec("onnxruntime") is None:
            pytest.skip("onnxruntime is not installed")
        import onnxruntime

        if DEVICE.type == "cuda" and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            pytest.skip("this onnxruntime has no CUDA execution provider (onnxruntime-gpu)")


def compile_case(case: Case, cache_dir, backend: str, precision: str, options: dict):
    """The case's module compiled by ``backend``: the denoiser alone, or the ViT + denoiser."""
    torch.manual_seed(0)
    if case.kind == "denoiser":
        denoiser = Denoiser(case.channels, grid=(GRID, GRID)).eval().to(DEVICE)
        return deploy.compile(denoiser, (GRID, GRID), case.batch, backend=backend, precision=precision,
                                      device=DEVICE, cache_dir=cache_dir, **options)
    model = fastsrt.load_timm_model(case.model, pretrained=False).eval().to(DEVICE)
    grid = case.size // model.patch_embed.patch_size[0]
    torch.manual_seed(1)
    denoiser = Denoiser(case.channels, grid=(grid, grid)).eval().to(DEVICE)
    return deploy.compile_pipeline(model, denoiser, case.size, case.batch, backend=backend, precision=precision,
                                           device=DEVICE, cache_dir=cache_dir, **options)


def test_denoiser(benchmark, case, tmp_path):
    benchmark.group = case.group
    backend, precision, options, _ = BACKENDS[case.backend]
    skip_if_missing(backend)
    shape = (case.channels, GRID, GRID) if case.kind == "denoiser" else (3, case.size, case.size)
    inputs = torch.randn(case.batch, *shape, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with torch.no_grad():
        expected = compile_case(case, tmp_path / "eager", "torch", "fp32", BACKENDS["eager-fp32"][2])(inputs)
    compiled = []

    def build():
        try:
            compiled.append(compile_case(case, tmp_path / "built", backend, precision, options))
        except Unavailable as error:
            pytest.skip(str(error))
        return lambda: compiled[0](inputs)

    dims = dict(kind=case.kind, channels=case.channels, batch=case.batch)
    if case.kind == "vit+denoiser":
        dims.update(model=case.model, size=case.size)
    with torch.no_grad():
        output = harness.measure(benchmark, build, impl=case.backend, baseline=case.backend == "eager-fp32",
                                 dtype={"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[precision],
                                 images=case.batch, shape=dims)
    benchmark.extra_info["ran"] = f"{compiled[0].backend} {compiled[0].precision}"
    error = ((output.double() - expected.double()).norm() / expected.double().norm()).item()
    benchmark.extra_info["rel_err_vs_eager_fp32"] = float(f"{error:.2e}")
    tolerance = TENSORRT_FP32_TOLERANCE if (backend, precision) == ("tensorrt", "fp32") else TOLERANCES[precision]
    assert output.shape == expected.shape and error <= tolerance, error
