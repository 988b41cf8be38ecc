"""SRT, the Stochastic Resonance Transformer (Lao et al., ICML 2024).

Run the ViT on sub-token-shifted copies of the image, upsample each view's token grid to pixels,
undo the shift, and aggregate over views into a pixel-resolution feature field.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fastsrt.backbone import Layers, as_backbone
from fastsrt.checks import check_choice
from fastsrt.ops.shift import PADDINGS, check_shifts_fit, shift_images
from fastsrt.ops.warp_aggregate import IMPLS, OUTPUTS, REDUCES, UPSAMPLES, warp_aggregate
from fastsrt.views import as_shifts


@dataclass
class SRTOutput:
    """features: (B, C, H, W) for output="pixel", (B, C, H/p, W/p) for "token"; a list of those,
    one per layer, when several layers were asked for. std: the same shapes, the per-pixel
    standard deviation across views (the paper's noise map), when asked for. prefix: (B, P, C),
    the prefix tokens (CLS, registers) averaged over views, when asked for (a list per layer too)."""

    features: torch.Tensor | list[torch.Tensor]
    std: torch.Tensor | list[torch.Tensor] | None = None
    prefix: torch.Tensor | list[torch.Tensor] | None = None


class SRT(nn.Module):
    """Stochastic Resonance Transformer around a backbone.

    Args:
        model: a timm ViT, a timm model name (pretrained weights), a fastsrt Backbone, or a
            callable images -> token grids (then ``patch_size`` is required).
        shifts: an int d -> the paper's grid, the identity view plus every (dy, dx) with
            |dy|, |dx| <= d (1 + (2d+1)^2 views; d=3 gives the authors' 50); or a sequence of
            (dy, dx) int pairs, duplicates allowed. View convention: view(y, x) = image(y-dy, x-dx).
        layer: block index (negative from the end; -1 = the final normed tokens) or a sequence.
        upsample: "nearest" (paper) or "bilinear" (F.interpolate, align_corners=False).
        padding: fill of the shifted images: "zeros" (paper), "replicate" or "reflect".
        reduce: "mean" (paper) or "median" (lower middle for even counts).
        ignore_padding: False (paper) counts pixels a view does not cover as 0 and divides by the
            number of views; True reduces over the covering views only.
        output: "pixel" (B, C, H, W) or "token" (average-pooled to (B, C, H/p, W/p)).
        impl: how views are aggregated (fastsrt.ops.warp_aggregate): "auto" (the fused Triton
            kernel on CUDA, the chunked torch path on CPU), "reference", "fused" or "chunked";
            ``impl_used`` says what ran (a missing Triton/GPU falls back to "chunked", warning once).
        view_batch: images per backbone forward (views x batch), bounding memory.
        pad_to_patch: pad image sides to a multiple of the patch instead of raising; pixel
            output is cropped back to the input size.
    """

    def __init__(
        self,
        model,
        shifts: int | Sequence[Sequence[int]] = 3,
        layer: Layers = -1,
        upsample: str = "nearest",
        padding: str = "zeros",
        reduce: str = "mean",
        ignore_padding: bool = False,
        output: str = "pixel",
        impl: str = "auto",
        view_batch: int = 32,
        patch_size: int | None = None,
        pad_to_patch: bool = False,
        pretrained: bool | str = True,
    ):
        super().__init__()
        check_choice("upsample", upsample, UPSAMPLES)
        check_choice("padding", padding, PADDINGS)
        check_choice("reduce", reduce, REDUCES)
        check_choice("output", output, OUTPUTS)
        check_choice("impl", impl, IMPLS)
        if view_batch < 1:
            raise ValueError(f"view_batch must be >= 1, got {view_batch}")
        self.backbone = as_backbone(model, patch_size=patch_size, pretrained=pretrained, pad_to_patch=pad_to_patch)
        self.layers = self.backbone.layer_indices(layer)  # validates
        self.layer = layer
        self.shifts = as_shifts(shifts)
        self.upsample, self.padding, self.reduce = upsample, padding, reduce
        self.ignore_padding, self.output, self.impl = ignore_padding, output, impl
        self.view_batch = view_batch
        self.impl_used: str | None = None

    @property
    def patch_size(self) -> int:
        return self.backbone.patch_size

    def forward(self, images: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        return self.run(images).features

    @torch.no_grad()
    def run(self, images: torch.Tensor, std: bool = False, prefix: bool = False) -> SRTOutput:
        """The SRT features of a batch of normalised images (B, 3, H, W), optionally with the
        per-pixel standard deviation across views and the view-averaged prefix tokens.
        Runs without gradients."""
        padded = self.backbone.prepare(images)  # validates images
        height, width = images.shape[-2:]
        check_shifts_fit(self.shifts, height, width)
        tokens, prefixes = self.view_tokens(padded, prefix)
        features, stds = [], []
        for layer_tokens in tokens:
            aggregate, deviation, self.impl_used = warp_aggregate(
                layer_tokens, self.shifts, self.patch_size, self.upsample, self.reduce,
                self.ignore_padding, self.output, return_std=std, impl=self.impl,
            )
            if self.output == "pixel":  # drop the padding of pad_to_patch
                aggregate = aggregate[..., :height, :width]
                deviation = deviation[..., :height, :width] if std else None
            features.append(aggregate)
            stds.append(deviation)
        single = isinstance(self.layer, int)
        pick = (lambda values: values[0]) if single else (lambda values: values)
        return SRTOutput(
            features=pick(features),
            std=pick(stds) if std else None,
            prefix=pick([p.mean(0) for p in prefixes]) if prefix else None,
        )

    def view_tokens(self, images: torch.Tensor, prefix: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Backbone tokens of every view: per layer (K, B, C, h, w), and the prefix tokens per layer
        (K, B, P, C) when asked for. Views go through the backbone ``view_batch`` images at a time."""
        batch = images.shape[0]
        views_per_call = max(1, self.view_batch // batch)
        tokens = [[] for _ in self.layers]
        prefixes = [[] for _ in self.layers]
        for start in range(0, len(self.shifts), views_per_call):
            shifts = self.shifts[start : start + views_per_call]
            out = self.backbone(shift_images(images, shifts, self.padding), self.layers, return_prefix=prefix)
            for i, layer_tokens in enumerate(out.tokens):
                tokens[i].append(layer_tokens.unflatten(0, (len(shifts), batch)))
                if prefix:
                    prefixes[i].append(out.prefix[i].unflatten(0, (len(shifts), batch)))
        return [torch.cat(t) for t in tokens], [torch.cat(p) for p in prefixes] if prefix else []
