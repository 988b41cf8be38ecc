"""The ONNX Runtime backend: an exported model run by onnxruntime, on the CPU, or on the GPU
through its CUDA execution provider (with torch tensors bound in place, no copies)."""
from __future__ import annotations

import os

import numpy as np
import torch

from fastsrt.errors import Unavailable


def require_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise Unavailable("onnxruntime is not installed: pip install onnxruntime (onnxruntime-gpu for CUDA), "
                          "or fastsrt[onnx]") from None
    return onnxruntime


def cuda_provider_missing() -> bool:
    """Whether this onnxruntime lacks the CUDA execution provider (the CPU-only package)."""
    return "CUDAExecutionProvider" not in require_onnxruntime().get_available_providers()


class OnnxRuntimeRunner:
    """Runs an ONNX file with one input and one output on torch tensors of ``device``."""

    def __init__(self, path: str | os.PathLike, device: torch.device, threads: int | None = None):
        ort = require_onnxruntime()
        self.device = torch.device(device)
        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda":
            if cuda_provider_missing():
                raise Unavailable("this onnxruntime has no CUDA execution provider: pip install onnxruntime-gpu")
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": self.device.index or 0}))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input, self.output = self.session.get_inputs()[0], self.session.get_outputs()[0]

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        inputs = inputs.detach().float().contiguous()
        if self.device.type == "cpu":
            return torch.from_numpy(self.session.run([self.output.name], {self.input.name: inputs.numpy()})[0])
        # GPU: bind the torch buffers; the output's symbolic (batch) axis takes the input's batch
        shape = [inputs.shape[0] if not isinstance(d, int) else d for d in self.output.shape]
        outputs = torch.empty(shape, dtype=torch.float32, device=self.device)
        binding = self.session.io_binding()
        index = self.device.index or 0
        binding.bind_input(self.input.name, "cuda", index, np.float32, tuple(inputs.shape), inputs.data_ptr())
        binding.bind_output(self.output.name, "cuda", index, np.float32, tuple(shape), outputs.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # onnxruntime runs on its own stream
        self.session.run_with_iobinding(binding)
        return outputs
