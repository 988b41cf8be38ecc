"""``fastsrt.deploy.compile``: the denoiser (or ViT + denoiser) as the fastest callable the machine
allows, at a fixed token grid (image size) and a maximum batch.

Backends (``fastsrt.deploy.backends``): "tensorrt" (ONNX -> engine, cached on disk), "torch"
(torch.compile + one CUDA graph on a GPU, eager on the CPU), "onnxruntime" (the exported ONNX
file), and "auto": TensorRT where it imports and a GPU is present, otherwise the next best; the
choice and the reason are logged and kept on the result (``.backend``, ``.why``).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from fastsrt.deploy.backends import select_backend
from fastsrt.deploy.cache import default_cache_dir
from fastsrt.deploy.export import FixedSizePipeline
from fastsrt.dvt.denoiser import Denoiser

logger = logging.getLogger("fastsrt.deploy")


class CompiledModule:
    """A fixed-shape module behind one backend: (B, *input_shape) -> its output, 1 <= B <= max_batch,
    tensors on ``device``. Attributes: backend, why (the reason for the choice), files (built)."""

    def __init__(self, runner, backend: str, why: str, input_shape: tuple, max_batch: int, device: torch.device,
                 precision: str, files: dict[str, Path]):
        self.runner, self.backend, self.why = runner, backend, why
        self.input_shape, self.max_batch, self.device = input_shape, max_batch, device
        self.precision, self.files = precision, files

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        if not isinstance(inputs, torch.Tensor):
            raise TypeError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
        expected = f"(B, {', '.join(map(str, self.input_shape))}) with 1 <= B <= {self.max_batch}"
        if inputs.dim() != 1 + len(self.input_shape) or tuple(inputs.shape[1:]) != self.input_shape \
                or not 1 <= inputs.shape[0] <= self.max_batch:
            raise ValueError(f"this compiled module takes {expected}, got shape {tuple(inputs.shape)}; "
                             "compile again for another grid, image size or batch")
        if not inputs.is_floating_point():
            raise TypeError(f"inputs must be floating point, got dtype {inputs.dtype}")
        if inputs.device.type != self.device.type:
            raise ValueError(f"inputs are on {inputs.device} but this compiled module runs on {self.device}")
        return self.runner(inputs)

    def __repr__(self) -> str:
        return (f"CompiledModule(backend={self.backend!r}, input={self.input_shape}, max_batch={self.max_batch}, "
                f"precision={self.precision!r}, device={str(self.device)!r})")


def compile_module(module: nn.Module, input_shape, batch: int, backend: str = "auto", precision: str = "fp32",
                   device=None, cache_dir: str | os.PathLike | None = None, **torch_options) -> CompiledModule:
    """Any fixed-size module (B, *input_shape) -> output behind the chosen backend (see ``compile``)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    input_shape = tuple(int(v) for v in input_shape)
    chosen, why = select_backend(backend, device, precision)
    logger.info("fastsrt.deploy: backend %s (%s)", chosen.name, why)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    runner, files = chosen(module.eval(), input_shape, batch, precision, device, cache, **torch_options)
    return CompiledModule(runner, chosen.name, why, input_shape, batch, device, precision, files)


def compile(denoiser: Denoiser, grid=(37, 37), batch: int = 1, backend: str = "auto", precision: str = "fp32",
            device=None, cache_dir: str | os.PathLike | None = None, **torch_options) -> CompiledModule:
    """The denoiser at one token grid as a callable (B, C, h, w) -> (B, C, h, w), B <= ``batch``.

    backend: "tensorrt", "torch", "onnxruntime" or "auto" (see the module docstring).
    precision: "fp32", "fp16" or "bf16" (TensorRT: a graph converted to it, fastsrt.deploy.precision; torch:
    the weights; onnxruntime: fp32 only).
    cache_dir: where ONNX files and engines are kept (default $FASTSRT_CACHE or ~/.cache/fastsrt).
    torch_options: for the torch backend: compile, cuda_graph (bool) and compile_mode.
    """
    if not isinstance(denoiser, Denoiser):
        raise TypeError(f"compile takes a fastsrt.dvt.Denoiser, got {type(denoiser).__name__}")
    fixed = denoiser.at_grid(grid)
    return compile_module(fixed, (fixed.dim, *fixed.grid), batch, backend, precision, device, cache_dir,
                          **torch_options)


def compile_pipeline(model, denoiser: Denoiser, image_size, batch: int = 1, backend: str = "auto",
                     precision: str = "fp32", layer: int | None = None, device=None,
                     cache_dir: str | os.PathLike | None = None, **torch_options) -> CompiledModule:
    """ViT + denoiser at one image size: normalised images (B, 3, H, W) -> clean (B, C, h, w)."""
    pipeline = FixedSizePipeline(model, denoiser, image_size, layer)
    return compile_module(pipeline, (3, *pipeline.image_size), batch, backend, precision, device, cache_dir,
                          **torch_options)
