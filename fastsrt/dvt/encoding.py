"""The 2-D multi-resolution hash-grid encoding of DVT's neural field F (REFERENCE.md, DVT stage 1;
Muller et al. 2022): a torch reference and an autograd Function over the C++/CUDA extension.

Level l has resolution R_l = floor(base * s^l), s = exp((ln max - ln base) / (levels - 1)), and a
table of min(2^log2_table_size, (R_l + 1)^2) rows of ``features`` values. A coordinate c in [0, 1]
is scaled to c * R_l; its cell is floor(c * R_l) clamped to [0, R_l - 1] (so c = 1 lies in the last
cell), and the cell's 4 vertices are mixed bilinearly. A vertex (x, y) is row y * (R_l + 1) + x
where the level's vertices fit its rows (dense), else (x XOR y * 2654435761) mod rows (uint32).
The output concatenates the levels: (B, N, levels * features).
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from fastsrt.checks import Unavailable, check_choice
from fastsrt.dvt.extension import load_extension

IMPLS = ("auto", "reference", "extension")
HASH_PRIME = 2654435761


@dataclass(frozen=True)
class GridEncodingConfig:
    """The encoding's shape. Defaults: the DVT authors' (16 levels x 8 features, 2^20 rows per
    level, resolutions 16 to 1024)."""

    levels: int = 16
    features: int = 8
    log2_table_size: int = 20
    base_resolution: int = 16
    max_resolution: int = 1024

    def __post_init__(self):
        for name in ("levels", "features", "log2_table_size", "base_resolution", "max_resolution"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.levels > 32:
            raise ValueError(f"levels must be <= 32, got {self.levels}")
        if self.log2_table_size > 30:
            raise ValueError(f"log2_table_size must be <= 30, got {self.log2_table_size}")
        if self.max_resolution < self.base_resolution:
            raise ValueError(f"max_resolution {self.max_resolution} is below base_resolution {self.base_resolution}")

    @property
    def output_dim(self) -> int:
        return self.levels * self.features

    @property
    def resolutions(self) -> list[int]:
        if self.levels == 1:
            return [self.base_resolution]
        scale = math.exp((math.log(self.max_resolution) - math.log(self.base_resolution)) / (self.levels - 1))
        return [math.floor(self.base_resolution * scale**level + 1e-6) for level in range(self.levels)]

    @property
    def level_rows(self) -> list[int]:
        return [min(2**self.log2_table_size, (resolution + 1) ** 2) for resolution in self.resolutions]

    @property
    def hashed(self) -> list[bool]:
        """Which levels hash (their vertices do not fit the table)."""
        return [(r + 1) ** 2 > rows for r, rows in zip(self.resolutions, self.level_rows)]

    @property
    def table_rows(self) -> int:
        return sum(self.level_rows)

    def level_table(self) -> torch.Tensor:
        """(levels, 3) int64 rows (resolution, first table row, rows), as the extension takes them."""
        rows = self.level_rows
        offsets = [sum(rows[:level]) for level in range(self.levels)]
        return torch.tensor(list(zip(self.resolutions, offsets, rows)), dtype=torch.int64)

    def init_table(self, images: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """A (images, table_rows, features) float32 table, uniform in [-1e-4, 1e-4] (tiny-cuda-nn's init)."""
        table = torch.rand(images, self.table_rows, self.features, generator=generator)
        return (table * 2 - 1) * 1e-4


def grid_encode_reference(coords: torch.Tensor, table: torch.Tensor, config: GridEncodingConfig) -> torch.Tensor:
    """Plain torch encoding (any float dtype, differentiable in coords and table): the semantics."""
    batch, points, _ = coords.shape
    resolutions, rows_per_level = config.resolutions, config.level_rows
    outputs, offset = [], 0
    for resolution, rows, hashed in zip(resolutions, rows_per_level, config.hashed):
        scaled = coords * resolution
        cell = torch.where(scaled > 0, scaled, torch.zeros_like(scaled)).floor().clamp(max=resolution - 1)
        fraction = scaled - cell  # the gradient w.r.t. coords flows through here
        cell = cell.long()
        corner_rows, weights = [], []
        for dy in (0, 1):
            for dx in (0, 1):  # vertex order (i, j), (i+1, j), (i, j+1), (i+1, j+1), as in fastsrt/csrc
                x, y = cell[..., 0] + dx, cell[..., 1] + dy
                if hashed:
                    row = ((x ^ (y * HASH_PRIME)) & 0xFFFFFFFF) % rows
                else:
                    row = y * (resolution + 1) + x
                corner_rows.append(row + offset)
                wx = fraction[..., 0] if dx else 1 - fraction[..., 0]
                wy = fraction[..., 1] if dy else 1 - fraction[..., 1]
                weights.append(wx * wy)
        index = torch.stack(corner_rows, -1).reshape(batch, points * 4, 1).expand(-1, -1, table.shape[-1])
        values = table.gather(1, index).reshape(batch, points, 4, -1)
        outputs.append((torch.stack(weights, -1)[..., None] * values).sum(2))
        offset += rows
    return torch.cat(outputs, -1)


class _ExtensionEncoding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, coords, table, levels, extension):
        out = coords.new_empty(coords.shape[0], coords.shape[1], levels.shape[0] * table.shape[2])
        extension.forward(coords, table, levels, out)
        ctx.save_for_backward(coords, table)
        ctx.levels, ctx.extension = levels, extension
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        coords, table = ctx.saved_tensors
        grad_table = torch.zeros_like(table) if ctx.needs_input_grad[1] else None
        grad_coords = torch.empty_like(coords) if ctx.needs_input_grad[0] else None
        ctx.extension.backward(grad_out.contiguous(), coords, table, ctx.levels, grad_table, grad_coords)
        return grad_coords, grad_table, None, None


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


def extension_for(device: torch.device, dtype: torch.dtype, impl: str = "auto"):
    """The extension module to encode with on this device and dtype, or None for the reference.
    impl "extension" raises where the extension cannot run; "auto" falls back to the reference."""
    check_choice("impl", impl, IMPLS)
    if impl == "reference":
        return None
    if dtype not in (torch.float32, torch.float64):
        extension, reason = None, f"it takes float32 or float64, not {dtype}"
    else:
        extension, reason = load_extension(), "it could not be built (see the warning above)"
        if extension is not None and device.type == "cuda" and not extension.has_cuda():
            extension, reason = None, "it was built without CUDA kernels (no nvcc or GPU at build time)"
            _warn_once(f"grid encoding on {device} uses the torch encoding: {reason}")
    if extension is None and impl == "extension":
        raise Unavailable(f"impl='extension' is unavailable here: {reason}")
    return extension


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


@functools.cache
def _level_table(config: GridEncodingConfig) -> torch.Tensor:
    return config.level_table()


def grid_encode(coords: torch.Tensor, table: torch.Tensor, config: GridEncodingConfig, impl: str = "auto") -> torch.Tensor:
    """Encodes coords (B, N, 2) in [0, 1] with a table (B, table_rows, features) -> (B, N, levels * features).

    impl: "extension" (C++/OpenMP on CPU, CUDA on GPU), "reference" (plain torch) or "auto" (the
    extension where it is available, else the reference). Differentiable in coords and table.
    """
    check_encoding_inputs(coords, table, config)
    extension = extension_for(coords.device, coords.dtype, impl)
    if extension is None:
        return grid_encode_reference(coords, table, config)
    return _ExtensionEncoding.apply(coords.contiguous(), table.contiguous(), _level_table(config), extension)
