"""Which grid encoding runs (the convention of fastsrt.dispatch): the C++/CUDA extension where it
can run on the inputs, else the torch reference, which runs anywhere."""
from __future__ import annotations

import torch

from fastsrt.dispatch import Implementation, choose
from fastsrt.ops.grid_encoding import extension
from fastsrt.ops.grid_encoding.reference import GridEncodingConfig, grid_encode_reference


class ExtensionEncoding(Implementation):
    name = "extension"
    auto_devices = frozenset({"cpu", "cuda"})

    def not_supported_reasons(self, coords, table, config) -> list[str]:
        reasons = []
        if coords.dtype not in (torch.float32, torch.float64):
            reasons.append(f"the extension takes float32 or float64, not {coords.dtype}")
        if coords.device.type not in ("cpu", "cuda"):
            reasons.append(f"the extension runs on CPU and CUDA tensors, not {coords.device.type}")
        problem = extension.why_unavailable()
        if problem:
            reasons.append(f"the C++ grid-encoding extension is unavailable: {problem}")
        elif coords.device.type == "cuda" and not extension.load_extension().has_cuda():
            reasons.append(f"the extension was built without CUDA kernels: {extension.why_no_cuda()}")
        return reasons

    def __call__(self, coords, table, config):
        return extension.grid_encode_extension(coords, table, config)


class ReferenceEncoding(Implementation):
    name = "reference"

    def __call__(self, coords, table, config):
        return grid_encode_reference(coords, table, config)


IMPLEMENTATIONS = (ExtensionEncoding(), ReferenceEncoding())  # in auto's order of preference


def check_encoding_inputs(coords: torch.Tensor, table: torch.Tensor, config: GridEncodingConfig) -> None:
    if not isinstance(coords, torch.Tensor) or coords.dim() != 3 or coords.shape[-1] != 2:
        raise ValueError(f"coords must be a (B, N, 2) tensor, got {_shape(coords)}")
    expected = (coords.shape[0], config.table_rows, config.features)
    if not isinstance(table, torch.Tensor) or tuple(table.shape) != expected:
        raise ValueError(f"table must have shape {expected} for this config, got {_shape(table)}")
    if coords.dtype != table.dtype or not coords.is_floating_point():
        raise TypeError(f"coords and table must share a floating dtype, got {coords.dtype} and {table.dtype}")
    if coords.device != table.device:
        raise ValueError(f"coords on {coords.device} but table on {table.device}")


def _shape(value) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def choose_encoding(coords: torch.Tensor, table: torch.Tensor, config: GridEncodingConfig,
                    impl: str = "auto") -> Implementation:
    """The implementation that encodes inputs like these for ``impl`` (see ``grid_encode``); its
    ``name`` says what runs. Checks the inputs; the choice holds for any inputs of the same dtype
    and device, so a loop can choose once."""
    check_encoding_inputs(coords, table, config)
    return choose("grid encoding", IMPLEMENTATIONS, impl, coords.device.type, coords, table, config)


def grid_encode(coords: torch.Tensor, table: torch.Tensor, config: GridEncodingConfig,
                impl: str = "auto") -> torch.Tensor:
    """Encodes coords (B, N, 2) in [0, 1] with a table (B, table_rows, features) -> (B, N, levels * features).

    impl: "extension" (C++/OpenMP on CPU, CUDA on GPU; ``Unavailable`` where it cannot run),
    "reference" (plain torch) or "auto" (the extension where it can run, else the reference, with
    one warning saying why). Differentiable in coords and table.
    """
    return choose_encoding(coords, table, config, impl)(coords, table, config)
