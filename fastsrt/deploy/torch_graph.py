"""The torch backend: eager, or torch.compile, and on CUDA one CUDA graph replayed per call.

The graph is captured for the largest batch; a smaller batch is copied into the front of the
static input and the front of the static output is returned (samples are independent: attention
and the norms act within a sample).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from fastsrt.options import torch_dtype

# torch.compile modes that capture CUDA graphs themselves: a second capture around them fails
GRAPHING_MODES = ("reduce-overhead", "max-autotune")


class TorchRunner:
    """Runs a copy of ``module`` in the chosen precision on ``device`` (the caller's module is left
    as it is); inputs of any floating dtype are cast in, outputs cast back to the input's dtype."""

    def __init__(self, module: nn.Module, input_shape, batch: int, precision: str = "fp32", device="cpu",
                 compile: bool | None = None, cuda_graph: bool | None = None, compile_mode: str = "default"):
        self.device, self.dtype = torch.device(device), torch_dtype(precision)
        on_gpu = self.device.type == "cuda"
        self.compiled = on_gpu if compile is None else compile
        use_graph = on_gpu if cuda_graph is None else cuda_graph
        if use_graph and self.compiled and compile_mode in GRAPHING_MODES:
            raise ValueError(f"compile_mode={compile_mode!r} captures CUDA graphs itself; "
                             "pass cuda_graph=False with it")
        if use_graph and not on_gpu:
            raise ValueError("CUDA graphs need a CUDA device")
        module = copy.deepcopy(module).to(self.device, self.dtype).eval().requires_grad_(False)
        if self.compiled:
            module = torch.compile(module, mode=compile_mode, fullgraph=True, dynamic=False)
        self.function = module
        self.graph = None
        if use_graph:
            self._capture(tuple(input_shape), batch)

    def _capture(self, input_shape: tuple, batch: int) -> None:
        self.static_input = torch.randn(batch, *input_shape, device=self.device, dtype=self.dtype)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(3):  # compiles, autotunes and allocates outside the capture
                self.function(self.static_input)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.static_output = self.function(self.static_input)

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.graph is None:
            return self.function(inputs.to(self.dtype)).to(inputs.dtype)
        count = inputs.shape[0]
        self.static_input[:count].copy_(inputs)
        self.graph.replay()
        return self.static_output[:count].to(inputs.dtype, copy=True)
