"""Shifting images by integer offsets: the views of SRT (reference path).

view(y, x) = image(y - dy, x - dx). Pixels whose source lies outside the image are filled by
``padding``: "zeros" (the SRT paper: 0 is the mean colour of a normalised image), "replicate"
(the nearest border pixel) or "reflect" (mirrored about the border pixel, which is not repeated,
as torch.nn.functional.pad's "reflect").
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from fastsrt.options import PADDINGS


def check_shifts_fit(shifts: Sequence[tuple[int, int]], height: int, width: int) -> None:
    """A shift must be smaller than the image: a view shifted by the whole image shows nothing of it."""
    for dy, dx in shifts:
        if abs(dy) >= height or abs(dx) >= width:
            raise ValueError(f"shift ({dy}, {dx}) is as large as the {height}x{width} image or larger")


def source_index(size: int, shift: int, padding: str, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """For each output position i along one axis: the source position i - shift after padding,
    and whether it lies inside the image (always True except for "zeros")."""
    source = torch.arange(size, device=device) - shift
    inside = (source >= 0) & (source < size)
    if padding == "zeros" or padding == "replicate":
        index = source.clamp(0, size - 1)
    elif padding == "reflect":
        index = torch.where(source < 0, -source, torch.where(source >= size, 2 * (size - 1) - source, source))
    else:
        raise ValueError(f"padding={padding!r} is not one of {', '.join(repr(p) for p in PADDINGS)}")
    if padding != "zeros":
        inside = torch.ones_like(inside)
    return index, inside


def shift_images(images: torch.Tensor, shifts: Sequence[tuple[int, int]], padding: str = "zeros") -> torch.Tensor:
    """All views of a batch: (B, C, H, W) and K shifts -> (K * B, C, H, W), view-major
    (row k * B + b is image b shifted by shifts[k])."""
    height, width = images.shape[-2:]
    check_shifts_fit(shifts, height, width)
    views = []
    for dy, dx in shifts:
        rows, rows_inside = source_index(height, dy, padding, images.device)
        cols, cols_inside = source_index(width, dx, padding, images.device)
        inside = (rows_inside[:, None] & cols_inside[None, :]).to(images.dtype)
        views.append(images[:, :, rows[:, None], cols[None, :]] * inside)
    return torch.cat(views)
