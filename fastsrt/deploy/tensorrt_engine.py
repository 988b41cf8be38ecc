"""The TensorRT backend: an ONNX file -> a serialized engine (fp32, fp16 or bf16 kernels, a
dynamic batch profile) through TensorRT's own Python API, run on torch CUDA tensors in place.

TensorRT is imported only when this backend is asked for; ``require_tensorrt`` turns its
absence into one ``Unavailable`` naming the package.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from fastsrt.checks import check_choice
from fastsrt.errors import Unavailable
from fastsrt.io import atomic_path
from fastsrt.options import PRECISIONS


def require_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise Unavailable("TensorRT is not installed: pip install tensorrt (or fastsrt[trt]); it runs on CUDA GPUs "
                          "only") from None
    return tensorrt


def tensorrt_version() -> str:
    return require_tensorrt().__version__


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, input_shape, batch: tuple[int, int, int],
                 precision: str = "fp16", workspace_bytes: int = 4 << 30) -> Path:
    """Builds a TensorRT engine for inputs (B, *input_shape) with min/opt/max B = ``batch`` and
    writes it atomically to ``engine_path``. fp16/bf16 let TensorRT pick reduced-precision
    kernels; the engine's inputs and outputs stay float32."""
    check_choice("precision", precision, PRECISIONS)
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])  # TensorRT 10 has only explicit-batch networks, and no flag for it
    network = builder.create_network(0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    profile = builder.create_optimization_profile()
    shape = tuple(int(v) for v in input_shape)
    profile.set_shape(network.get_input(0).name, *((b, *shape) for b in batch))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT could not build an engine from {onnx_path} (see its log above)")
    with atomic_path(engine_path) as temporary:
        temporary.write_bytes(bytes(serialized))
    return Path(engine_path)


class TensorRTRunner:
    """Runs a serialized engine with one input and one output on CUDA tensors, on torch's
    current stream, writing into a fresh torch output tensor."""

    def __init__(self, engine_path: str | os.PathLike, device: torch.device):
        trt = require_tensorrt()
        self.device = torch.device(device)
        with torch.cuda.device(self.device):
            self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
            if self.engine is None:
                raise RuntimeError(f"TensorRT cannot load the engine {engine_path} (built by another version or GPU?)")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        modes = {name: self.engine.get_tensor_mode(name) for name in names}
        self.input = next(n for n in names if modes[n] == trt.TensorIOMode.INPUT)
        self.output = next(n for n in names if modes[n] == trt.TensorIOMode.OUTPUT)

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        inputs = inputs.detach().to(self.device, torch.float32).contiguous()
        with torch.cuda.device(self.device):  # the engine's GPU, whatever the caller's current device
            if not self.context.set_input_shape(self.input, tuple(inputs.shape)):
                raise RuntimeError(f"TensorRT refused input shape {tuple(inputs.shape)} "
                                   "(outside the engine's profile?)")
            shape = tuple(self.context.get_tensor_shape(self.output))
            outputs = torch.empty(shape, dtype=torch.float32, device=self.device)
            self.context.set_tensor_address(self.input, inputs.data_ptr())
            self.context.set_tensor_address(self.output, outputs.data_ptr())
            if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
                raise RuntimeError("TensorRT failed to run the engine")
        return outputs
