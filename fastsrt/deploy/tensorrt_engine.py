"""The TensorRT backend: an ONNX file -> a serialized engine (a dynamic batch profile) through
TensorRT's own Python API, run on torch CUDA tensors in place.

Precision is in the graph, not in builder flags. TensorRT 11 removed ``BuilderFlag.FP16`` and
``BuilderFlag.BF16`` (its 10.x -> 11.x migration guide: "strong typing with ModelOpt AutoCast"), so an
fp16 or bf16 engine is built from the graph ``fastsrt.deploy.precision`` converted, as a strongly typed
network: ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``, which TensorRT 10 needs asked for and TensorRT
11 accepts and ignores (every 11.x network is strongly typed). The fp32 engine is built as before,
from the float32 graph with no flags (on TensorRT 11 that network is strongly typed too, all float32).
No builder precision flag is ever set, on any version.

TensorRT is imported only when this backend is asked for; ``require_tensorrt`` turns its
absence into one ``Unavailable`` naming the package.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from fastsrt.checks import check_choice
from fastsrt.deploy.precision import graph_precision
from fastsrt.deploy.tensorrt_ops import unsupported_by_tensorrt
from fastsrt.errors import Unavailable, warn_once
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


def network_flags(trt, precision: str) -> int:
    """The ``create_network`` flags for a graph of ``precision``: none for fp32, STRONGLY_TYPED for
    fp16/bf16 (TensorRT >= 10; see the module docstring)."""
    if int(trt.__version__.split(".")[0]) < 10:
        raise Unavailable(f"TensorRT {trt.__version__} is too old: fastsrt needs TensorRT 10 or later "
                          "(pip install -U tensorrt)")
    return 0 if precision == "fp32" else 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, input_shape, batch: tuple[int, int, int],
                 precision: str = "fp32", workspace_bytes: int = 4 << 30) -> Path:
    """Builds a TensorRT engine for inputs (B, *input_shape) with min/opt/max B = ``batch`` and
    writes it atomically to ``engine_path``. ``onnx_path`` holds a graph of ``precision`` (for
    fp16/bf16, one ``fastsrt.deploy.precision.convert_precision`` wrote; checked); the engine's
    inputs and outputs are float32 whatever the precision."""
    import onnx

    check_choice("precision", precision, PRECISIONS)
    graph = onnx.load(str(onnx_path), load_external_data=False)
    found = graph_precision(graph)
    if found != precision:
        raise ValueError(f"{onnx_path} holds a {found} graph, not {precision}: convert it with "
                         "fastsrt.deploy.precision.convert_precision")
    trt = require_tensorrt()
    outside = unsupported_by_tensorrt(graph)
    if outside:  # TensorRT's parser has the last word; this names the likely culprits first
        warn_once(f"{onnx_path}: outside TensorRT's ONNX operator list: {'; '.join(outside[:5])}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt, precision))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errors}")
    ends = [network.get_input(0), network.get_output(0)]
    if any(end.dtype != trt.DataType.FLOAT for end in ends):
        raise RuntimeError(f"{onnx_path}: the network's input and output must be float32, got "
                           f"{', '.join(str(end.dtype) for end in ends)}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
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
