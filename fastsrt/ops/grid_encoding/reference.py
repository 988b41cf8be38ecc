"""The 2-D multi-resolution hash-grid encoding of DVT's neural field F ("DVT stage 1" in
docs/method.md; Muller et al. 2022): its configuration and its plain torch reference, which
defines the semantics the C++/CUDA extension (csrc/) follows.

Level l has resolution R_l = floor(base * s^l), s = exp((ln max - ln base) / (levels - 1)), and a
table of min(2^log2_table_size, (R_l + 1)^2) rows of ``features`` values. A coordinate c in [0, 1]
is scaled to c * R_l; its cell is floor(c * R_l) clamped to [0, R_l - 1] (so c = 1 lies in the last
cell), and the cell's 4 vertices are mixed bilinearly. A vertex (x, y) is row y * (R_l + 1) + x
where the level's vertices fit its rows (dense), else (x XOR y * 2654435761) mod rows (uint32).
The output concatenates the levels: (B, N, levels * features).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

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
            for dx in (0, 1):  # vertex order (i, j), (i+1, j), (i, j+1), (i+1, j+1), as in csrc/grid_encoding.h
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
