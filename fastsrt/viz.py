"""Pictures of feature fields: a joint PCA to RGB, and labelled panels side by side."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw


@dataclass(frozen=True)
class PCABasis:
    """Three principal directions of a feature space and the colour scale along them: applied to
    any number of maps (the frames of a video, say), equal features get equal colours."""

    mean: torch.Tensor  # (C,)
    components: torch.Tensor  # (C, k), k <= 3
    low: torch.Tensor  # (k,): the 1st and 99th percentiles of the fitted maps' projections
    high: torch.Tensor

    def colors(self, feature_map: torch.Tensor, size: tuple[int, int] | None = None) -> np.ndarray:
        """(C, h, w) -> (H, W, 3) uint8, resized (nearest) to ``size`` first; fewer than 3
        components leave the rest black."""
        size = tuple(feature_map.shape[-2:]) if size is None else tuple(size)
        resized = F.interpolate(feature_map[None].float().cpu(), size=size, mode="nearest")[0]
        projected = (resized.flatten(1).T - self.mean) @ self.components
        rgb = torch.zeros(len(projected), 3)
        rgb[:, : projected.shape[1]] = ((projected - self.low) / (self.high - self.low).clamp(min=1e-12)).clamp(0, 1)
        return (rgb.reshape(*size, 3).numpy() * 255).round().astype(np.uint8)


def fit_pca(feature_maps: Sequence[torch.Tensor], size: tuple[int, int] | None = None, samples: int = 50_000,
            seed: int = 0) -> PCABasis:
    """The PCA of (C, h, w) feature maps taken together, each first resized (nearest) to ``size``
    (by default the largest map's size, so every pixel of the picture counts once), and the colour
    scale of their projections, from up to ``samples`` random pixels."""
    if size is None:
        size = max((tuple(m.shape[-2:]) for m in feature_maps), key=lambda s: s[0] * s[1])
    maps = [F.interpolate(m[None].float().cpu(), size=size, mode="nearest")[0] for m in feature_maps]
    pixels = torch.cat([m.flatten(1).T for m in maps])  # (N, C)
    generator = torch.Generator().manual_seed(seed)
    sample = pixels[torch.randperm(len(pixels), generator=generator)[:samples]]
    mean = sample.mean(0)
    _, _, directions = torch.linalg.svd(sample - mean, full_matrices=False)
    components = directions[:3].T  # (C, 3); fewer than 3 channels give fewer components
    joint = ((pixels - mean) @ components)[torch.randperm(len(pixels), generator=generator)[:samples]]
    low, high = torch.quantile(joint, 0.01, dim=0), torch.quantile(joint, 0.99, dim=0)
    return PCABasis(mean, components, low, high)


def pca_colors(feature_maps: Sequence[torch.Tensor], size: tuple[int, int] | None = None, samples: int = 50_000,
               seed: int = 0) -> list[np.ndarray]:
    """(C, h, w) feature maps -> (H, W, 3) uint8 images coloured by their first three principal
    components. The PCA and the colour scale are fitted on all maps together (``fit_pca``), so equal
    colours mean equal features across panels. Maps are first resized (nearest) to ``size``, by
    default the largest map's size, so token grids show their blocks."""
    if size is None:
        size = max((tuple(m.shape[-2:]) for m in feature_maps), key=lambda s: s[0] * s[1])
    basis = fit_pca(feature_maps, size, samples, seed)
    return [basis.colors(m, size) for m in feature_maps]


# anchor colours of a dark-to-bright heat map (black, purple, orange, pale yellow)
_HEAT = torch.tensor([[0, 0, 4], [120, 28, 109], [237, 105, 37], [252, 255, 164]], dtype=torch.float32)


def heat_colors(values: torch.Tensor) -> np.ndarray:
    """(H, W) non-negative values -> (H, W, 3) uint8 heat map, scaled to the 99th percentile."""
    values = values.detach().float().cpu()
    top = torch.quantile(values.flatten()[:: max(1, values.numel() // 100_000)], 0.99).clamp(min=1e-12)
    position = (values / top).clamp(0, 1) * (len(_HEAT) - 1)
    low = position.floor().long().clamp(max=len(_HEAT) - 2)
    weight = (position - low)[..., None]
    rgb = _HEAT[low] * (1 - weight) + _HEAT[low + 1] * weight
    return rgb.round().to(torch.uint8).numpy()


def to_uint8_image(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8."""
    return (image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def side_by_side(panels: Sequence[np.ndarray], labels: Sequence[str], height: int = 320, gap: int = 8) -> Image.Image:
    """Panels (H, W, 3) uint8 scaled to a common height, in a row with a caption above each."""
    caption = 18
    scaled = []
    for panel in panels:
        image = Image.fromarray(panel)
        width = max(1, round(image.width * height / image.height))
        scaled.append(image.resize((width, height), Image.Resampling.NEAREST))
    total = sum(p.width for p in scaled) + gap * (len(scaled) + 1)
    canvas = Image.new("RGB", (total, height + caption + 2 * gap), "white")
    draw = ImageDraw.Draw(canvas)
    x = gap
    for image, label in zip(scaled, labels):
        draw.text((x, gap // 2), label, fill="black")
        canvas.paste(image, (x, gap + caption))
        x += image.width + gap
    return canvas
