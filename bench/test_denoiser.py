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
CPU_SHAPES = dict(channels=(384,), batches=(1, 4), pipelines=(("vit_small_patch14_dinov2", 112),))
TARGET_SHAPES = dict(channels=(384, 768), batches=(1, 32),
                     pipelines=(("vit_small_patch14_dinov2", 518), ("vit_base_patch14_dinov2", 518)))
MODEL_CHANNELS = {"vit_small_patch14_dinov2": 384, "vit_base_patch14_dinov2": 768}
# path -> (deploy backend, its torch options, GPU only)
PATHS = {
    "eager": ("torch", dict(compile=False, cuda_graph=False), False),
    "compile": ("torch", dict(compile=True, cuda_graph=False), False),
    "compile+cudagraph": ("torch", dict(compile=True, cuda_graph=True), True),
    "onnxruntime": ("onnxruntime", {}, False),
    "tensorrt": ("tensorrt", {}, True),
}
RUNS = (("eager", "fp32"), ("eager", "bf16"), ("compile", "fp32"), ("compile+cudagraph", "fp32"),
        ("compile+cudagraph", "bf16"), ("onnxruntime", "fp32"), ("tensorrt", "fp32"), ("tensorrt", "fp16"),
        ("tensorrt", "bf16"))
DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
TOLERANCES = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 3e-2}  # relative, vs eager float32 (tests/test_deploy.py)
TENSORRT_FP32_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Case:
    kind: str  # "denoiser" or "vit+denoiser"
    channels: int
    batch: int
    path: str  # a key of PATHS
    precision: str
    model: str = ""  # vit+denoiser
    size: int = 0  # vit+denoiser: image side

    @property
    def id(self) -> str:
        if self.kind == "denoiser":
            return f"denoiser-C{self.channels}-B{self.batch}-{self.path}-{self.precision}"
        model = self.model.removesuffix("_patch14_dinov2")
        return f"vit+denoiser-{model}-{self.size}px-B{self.batch}-{self.path}-{self.precision}"

    @property
    def group(self) -> str:
        if self.kind == "denoiser":
            return f"denoiser C={self.channels} {GRID}x{GRID} B={self.batch}"
        return f"vit+denoiser {self.model} {self.size}x{self.size} B={self.batch}"

    @property
    def gpu_only(self) -> bool:
        # compiling a whole ViT takes minutes on a CPU
        return PATHS[self.path][2] or (self.kind == "vit+denoiser" and self.path.startswith("compile"))


def pytest_generate_tests(metafunc):
    shapes = TARGET_SHAPES if metafunc.config.getoption("target_shapes") else CPU_SHAPES
    cases = [Case("denoiser", channels, batch, path, precision)
             for channels in shapes["channels"] for batch in shapes["batches"] for path, precision in RUNS]
    cases += [Case("vit+denoiser", MODEL_CHANNELS[model], 1, path, precision, model, size)
              for model, size in shapes["pipelines"] for path, precision in RUNS]
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


def make_modules(case: Case) -> tuple[torch.nn.Module | None, Denoiser]:
    """(the ViT or None, the denoiser at the case's grid), random weights."""
    torch.manual_seed(0)
    if case.kind == "denoiser":
        return None, Denoiser(case.channels, grid=(GRID, GRID)).eval().to(DEVICE)
    model = fastsrt.load_timm_model(case.model, pretrained=False).eval().to(DEVICE)
    grid = case.size // model.patch_embed.patch_size[0]
    return model, Denoiser(case.channels, grid=(grid, grid)).eval().to(DEVICE)


def compile_case(case: Case, model, denoiser: Denoiser, cache_dir, backend: str, precision: str, options: dict):
    """The denoiser alone, or the ViT + denoiser, compiled by ``backend``."""
    if model is None:
        return deploy.compile(denoiser, denoiser.grid, case.batch, backend=backend, precision=precision, device=DEVICE,
                              cache_dir=cache_dir, **options)
    return deploy.compile_pipeline(model, denoiser, case.size, case.batch, backend=backend, precision=precision,
                                   device=DEVICE, cache_dir=cache_dir, **options)


def test_denoiser(benchmark, case, tmp_path):
    benchmark.group = case.group
    backend, options, _ = PATHS[case.path]
    skip_if_missing(backend)
    shape = (case.channels, GRID, GRID) if case.kind == "denoiser" else (3, case.size, case.size)
    inputs = torch.randn(case.batch, *shape, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    model, denoiser = make_modules(case)
    with torch.no_grad():
        expected = compile_case(case, model, denoiser, tmp_path / "eager", "torch", "fp32", PATHS["eager"][1])(inputs)
    compiled = []

    def build():
        try:
            compiled.append(compile_case(case, model, denoiser, tmp_path / "built", backend, case.precision, options))
        except Unavailable as error:
            pytest.skip(str(error))
        return lambda: compiled[0](inputs)

    dims = dict(kind=case.kind, channels=case.channels, batch=case.batch)
    if case.kind == "vit+denoiser":
        dims.update(model=case.model, size=case.size)
    with torch.no_grad():
        output = harness.measure(benchmark, build, impl=case.path, dtype=DTYPE_NAMES[case.precision],
                                 baseline=(case.path, case.precision) == ("eager", "fp32"), images=case.batch,
                                 shape=dims)
    benchmark.extra_info["ran"] = f"{compiled[0].backend} {compiled[0].precision}"
    error = ((output.double() - expected.double()).norm() / expected.double().norm()).item()
    benchmark.extra_info["rel_err_vs_eager_fp32"] = float(f"{error:.2e}")
    tolerance = TOLERANCES[case.precision]
    if (backend, case.precision) == ("tensorrt", "fp32"):
        tolerance = TENSORRT_FP32_TOLERANCE
    assert output.shape == expected.shape and error <= tolerance, error
