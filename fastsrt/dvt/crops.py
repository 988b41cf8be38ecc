"""DVT stage-1 views: the full image plus random resized crops with flips, and the global
coordinates of every token of every view ("DVT stage 1" in docs/method.md)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Crops:
    """boxes: (V, 4) int64 (top, left, height, width) in pixels of the size x size image;
    flips: (V,) bool, horizontal flips. View 0 is the full image, unflipped."""

    boxes: torch.Tensor
    flips: torch.Tensor
    size: int


def sample_crops(views: int, size: int, scale=(0.1, 0.5), ratio=(3 / 4, 4 / 3), flip_probability: float = 0.5,
                 generator: torch.Generator | None = None) -> Crops:
    """The full image, then ``views - 1`` RandomResizedCrop boxes (area a fraction in ``scale`` of
    the image, aspect ratio log-uniform in ``ratio``, 10 tries, else the largest central crop
    of the closest allowed ratio; torchvision's rule), each flipped with ``flip_probability``."""
    boxes, flips = [(0, 0, size, size)], [False]
    for _ in range(views - 1):
        boxes.append(_random_box(size, scale, ratio, generator))
        flips.append(bool(torch.rand((), generator=generator) < flip_probability))
    return Crops(torch.tensor(boxes, dtype=torch.int64), torch.tensor(flips), size)


def _random_box(size: int, scale, ratio, generator) -> tuple[int, int, int, int]:
    area = size * size
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * torch.empty(()).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(()).uniform_(log_ratio[0], log_ratio[1], generator=generator).item())
        width, height = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < width <= size and 0 < height <= size:
            top = int(torch.randint(0, size - height + 1, (), generator=generator))
            left = int(torch.randint(0, size - width + 1, (), generator=generator))
            return top, left, height, width
    height = width = size  # the central crop of the closest allowed aspect ratio
    if ratio[0] > 1:
        height = round(size / ratio[0])
    elif ratio[1] < 1:
        width = round(size * ratio[1])
    return (size - height) // 2, (size - width) // 2, height, width


def render_views(image: torch.Tensor, crops: Crops, indices: range) -> torch.Tensor:
    """(3, size, size) image -> (len(indices), 3, size, size) views: each box resized to the full
    size (bilinear, antialiased, as torchvision's RandomResizedCrop) and flipped where asked."""
    views = []
    for index in indices:
        top, left, height, width = crops.boxes[index].tolist()
        view = image[:, top:top + height, left:left + width]
        if (height, width) != (crops.size, crops.size):
            view = F.interpolate(view[None], size=(crops.size, crops.size), mode="bilinear", align_corners=False,
                                 antialias=True)[0]
        views.append(view.flip(-1) if crops.flips[index] else view)
    return torch.stack(views)


def token_coordinates(crops: Crops, grid: int) -> torch.Tensor:
    """(V, grid, grid, 2) global (x, y) in [0, 1] of each view's tokens: a grid x grid linspace
    over the crop's extent (the full image: linspace(0, 1)), x mirrored for flipped views."""
    steps = torch.linspace(0, 1, grid, dtype=torch.float64)
    top, left, height, width = (crops.boxes[:, i, None].double() / crops.size for i in range(4))
    xs = left + width * steps  # (V, grid)
    xs = torch.where(crops.flips[:, None], xs.flip(-1), xs)
    ys = top + height * steps
    coords = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), -1)
    return coords.float()
