"""The deployment backends as ``fastsrt.dispatch`` implementations, each stating why it cannot
run on a device at a precision, and ``choose_backend``, which picks one through
``fastsrt.dispatch.choose``.

"auto" takes, in this order, the first that can run: TensorRT (CUDA only), ONNX Runtime (the CPU,
float32 only), torch (anywhere); passing over TensorRT on a GPU warns once. A backend asked for by
name that cannot run here raises ``Unavailable`` with its reasons.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fastsrt.checks import check_choice
from fastsrt.deploy.cache import cache_key, cached_file, module_hash
from fastsrt.deploy.export import OPSET, export_onnx, require_onnx_export
from fastsrt.deploy.ort import OnnxRuntimeRunner, cuda_provider_missing, require_onnxruntime
from fastsrt.deploy.precision import convert_precision, converter_version, require_autocast
from fastsrt.deploy.tensorrt_engine import TensorRTRunner, build_engine, require_tensorrt, tensorrt_version
from fastsrt.deploy.torch_graph import TorchRunner
from fastsrt.dispatch import Implementation, choose
from fastsrt.errors import Unavailable
from fastsrt.options import BACKENDS, PRECISIONS


def _missing(*requirements) -> list[str]:
    """The message of each requirement (a ``require_*`` function) that raises Unavailable here."""
    reasons = []
    for require in requirements:
        try:
            require()
        except Unavailable as error:
            reasons.append(str(error))
    return reasons


def cached_onnx(module: nn.Module, weights: str, input_shape: tuple, batch: int, cache: Path,
                precision: str = "fp32") -> Path:
    """The module (whose ``module_hash`` is ``weights``) exported to ONNX for batches up to ``batch``,
    for fp16/bf16 then converted to that precision (``fastsrt.deploy.precision``), each file from the
    cache when it is there and intact. The converted graph's key names the converter and its version."""
    exporter = f"onnx{OPSET}-torch{torch.__version__}"
    key = cache_key(weights, input_shape, (1, batch, batch), "fp32", exporter)
    exported = cached_file(cache / "onnx" / f"{key}.onnx",
                           lambda path: export_onnx(module, input_shape, path, max_batch=batch), "ONNX file")
    if precision == "fp32":
        return exported
    key = cache_key(weights, input_shape, (1, batch, batch), precision, f"{exporter}-{converter_version()}")
    return cached_file(cache / "onnx" / f"{key}.onnx", lambda path: convert_precision(exported, path, precision),
                       f"{precision} ONNX file")


class Backend(Implementation):
    """A deployment backend: ``not_supported_reasons(device, precision)``, and
    ``backend(module, input_shape, batch, precision, device, cache, **torch_options)`` -> (a runner
    of input batches, {kind: file built})."""

    merit = ""  # why "auto" takes it when it can run


class TensorRTBackend(Backend):
    name = "tensorrt"
    auto_devices = frozenset({"cuda"})
    merit = "TensorRT imports and a CUDA GPU is present"

    def not_supported_reasons(self, device: torch.device, precision: str) -> list[str]:
        if device.type != "cuda":
            return ["needs a CUDA device"]
        converter = [] if precision == "fp32" else [require_autocast]
        return _missing(require_tensorrt, require_onnx_export, *converter)

    def __call__(self, module, input_shape, batch, precision, device, cache, **torch_options):
        weights = module_hash(module)
        onnx_path = cached_onnx(module, weights, input_shape, batch, cache, precision)
        gpu = torch.cuda.get_device_properties(device)
        runtime = f"tensorrt-{tensorrt_version()}" + ("" if precision == "fp32" else f"-{converter_version()}")
        key = cache_key(weights, input_shape, (1, batch, batch), precision, runtime,
                        f"{gpu.name} sm{gpu.major}{gpu.minor}")
        engine_path = cached_file(cache / "engines" / f"{key}.engine",
                                  lambda path: build_engine(onnx_path, path, input_shape, (1, batch, batch), precision),
                                  "TensorRT engine")
        return TensorRTRunner(engine_path, device), {"onnx": onnx_path, "engine": engine_path}


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    auto_devices = frozenset({"cpu"})  # on a GPU, torch's CUDA graph is the next best after TensorRT
    merit = "onnxruntime runs float32 faster than eager torch on the CPU"

    def not_supported_reasons(self, device: torch.device, precision: str) -> list[str]:
        reasons = [] if precision == "fp32" else [f"runs fp32 only, not {precision}"]
        missing = _missing(require_onnxruntime, require_onnx_export)
        if device.type == "cuda" and not missing and cuda_provider_missing():
            missing = ["this onnxruntime has no CUDA execution provider: pip install onnxruntime-gpu"]
        return reasons + missing

    def __call__(self, module, input_shape, batch, precision, device, cache, **torch_options):
        onnx_path = cached_onnx(module, module_hash(module), input_shape, batch, cache)
        return OnnxRuntimeRunner(onnx_path, device), {"onnx": onnx_path}


class TorchBackend(Backend):
    name = "torch"
    merit = "torch runs everywhere (torch.compile + one CUDA graph on a GPU, eager on the CPU)"

    def __call__(self, module, input_shape, batch, precision, device, cache, **torch_options):
        return TorchRunner(module, input_shape, batch, precision, device, **torch_options), {}


IMPLEMENTATIONS = (TensorRTBackend(), OnnxRuntimeBackend(), TorchBackend())  # auto's order


def select_backend(backend: str, device: torch.device, precision: str) -> tuple[Backend, str]:
    """(the backend that runs, why). An explicit backend that cannot run here raises Unavailable
    with its reasons; "auto" warns once when it passes over one it prefers (TensorRT on a GPU)."""
    check_choice("backend", backend, BACKENDS)
    check_choice("precision", precision, PRECISIONS)
    chosen = choose("deploy", IMPLEMENTATIONS, backend, device.type, device, precision)
    if backend != "auto":
        return chosen, "asked for"
    preferred = [earlier for earlier in IMPLEMENTATIONS[: IMPLEMENTATIONS.index(chosen)]
                 if device.type in earlier.auto_devices]
    passed_over = [f"not {earlier.name}: {'; '.join(earlier.not_supported_reasons(device, precision))}"
                   for earlier in preferred]
    return chosen, "; ".join([*passed_over, chosen.merit])


def choose_backend(backend: str, device: torch.device, precision: str) -> tuple[str, str]:
    """(the name of the backend that runs, why): ``select_backend`` by name."""
    chosen, why = select_backend(backend, device, precision)
    return chosen.name, why
