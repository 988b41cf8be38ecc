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
from fastsrt.backbone_fused import (
    DTYPES,
    FusedViews,
    auto_view_batch,
    fused_views_unsupported,
    precision,
)
from fastsrt.checks import check_choice
from fastsrt.ops import _triton
from fastsrt.ops._triton import warn_once
from fastsrt.ops.shift import PADDINGS, check_shifts_fit, shift_images
from fastsrt.ops.warp_aggregate import (
    IMPLS,
    OUTPUTS,
    REDUCES,
    UPSAMPLES,
    warp_aggregate,
)
from fastsrt.views import as_shifts


@dataclass
class SRTOutput:
    """features: (B, C, H, W) for output="pixel", (B, C, H/p, W/p) for "token"; a list of those,
    one per layer, when several layers were asked for. std: the same shapes, the per-pixel
    standard deviation across views (the paper's noise map), when asked for. prefix: (B, P, C),
    the prefix tokens (CLS, registers) averaged over views, when asked for (a list per layer too).
    views_impl, aggregation_impl: what ran for the views ("fused" or "reference") and for the
    aggregation ("fused", "chunked" or "reference"); ``impl`` says both in one string."""

    features: torch.Tensor | list[torch.Tensor]
    std: torch.Tensor | list[torch.Tensor] | None = None
    prefix: torch.Tensor | list[torch.Tensor] | None = None
    views_impl: str = ""
    aggregation_impl: str = ""

    @property
    def impl(self) -> str:
        """One name where views and aggregation agree ("fused"), else both ("reference views +
        chunked aggregation")."""
        if self.views_impl == self.aggregation_impl:
            return self.views_impl
        return f"{self.views_impl} views + {self.aggregation_impl} aggregation"


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
        impl: "auto", "reference", "fused" or "chunked". "fused" makes the views' patch embeddings
            with one kernel straight from the images (fastsrt.ops.patch_embed), runs the rest of the
            ViT from them (fastsrt.backbone_fused) and aggregates with the fused Triton kernel
            (fastsrt.ops.warp_aggregate); backbones it cannot run (not a timm VisionTransformer/Eva)
            use the reference views, and a missing Triton/GPU the "chunked" aggregation, each with
            one warning. "chunked" makes the views as shifted images and aggregates with the
            memory-efficient torch path. "auto" is "fused" on CUDA, "chunked" elsewhere.
            ``views_used``, ``aggregation_used`` and ``impl_used`` say what ran.
        view_batch: images per backbone forward (views x batch), bounding memory; "auto" fits
            the free GPU memory (measured on the first call per image size), 32 on CPU.
        dtype: None/float32, or bfloat16/float16 for mixed precision (autocast) in the backbone.
        compile: torch.compile the backbone blocks of the fused path.
        cuda_graph: capture the fused path's backbone calls as CUDA graphs (fixed shapes, CUDA).
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
        view_batch: int | str = "auto",
        patch_size: int | None = None,
        pad_to_patch: bool = False,
        pretrained: bool | str = True,
        dtype: torch.dtype | None = None,
        compile: bool = False,
        cuda_graph: bool = False,
    ):
        super().__init__()
        check_choice("upsample", upsample, UPSAMPLES)
        check_choice("padding", padding, PADDINGS)
        check_choice("reduce", reduce, REDUCES)
        check_choice("output", output, OUTPUTS)
        check_choice("impl", impl, IMPLS)
        check_choice("dtype", dtype, DTYPES)
        if view_batch != "auto" and (isinstance(view_batch, bool) or not isinstance(view_batch, int) or view_batch < 1):
            raise ValueError(f"view_batch must be an int >= 1 or 'auto', got {view_batch!r}")
        self.backbone = as_backbone(model, patch_size=patch_size, pretrained=pretrained, pad_to_patch=pad_to_patch)
        self.layers = self.backbone.layer_indices(layer)  # validates
        self.layer = layer
        self.shifts = as_shifts(shifts)
        self.upsample, self.padding, self.reduce = upsample, padding, reduce
        self.ignore_padding, self.output, self.impl = ignore_padding, output, impl
        self.view_batch = view_batch
        self.dtype = dtype
        self.views_used: str | None = None
        self.aggregation_used: str | None = None
        self.compile, self.cuda_graph = compile, cuda_graph
        self.fused_views: FusedViews | None = None  # made on first use
        self._auto_view_batch: dict[tuple, int] = {}

    @property
    def patch_size(self) -> int:
        return self.backbone.patch_size

    @property
    def impl_used(self) -> str | None:
        """What the last call ran: one name where views and aggregation agree, else both."""
        if self.views_used == self.aggregation_used:
            return self.views_used
        return f"{self.views_used} views + {self.aggregation_used} aggregation"

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
            aggregate, deviation, self.aggregation_used = warp_aggregate(
                layer_tokens, self.shifts, self.patch_size, self.upsample, self.reduce,
                self.ignore_padding, self.output, return_std=std, impl=self.impl,
            )
            if self.output == "pixel":  # drop the padding of pad_to_patch
                aggregate = aggregate[..., :height, :width]
                deviation = deviation[..., :height, :width] if std else None
            features.append(aggregate)
            stds.append(deviation)
        single = not isinstance(self.layer, (list, tuple))
        pick = (lambda values: values[0]) if single else (lambda values: values)
        return SRTOutput(
            features=pick(features),
            std=pick(stds) if std else None,
            prefix=pick([p.mean(0) for p in prefixes]) if prefix else None,
            views_impl=self.views_used,
            aggregation_impl=self.aggregation_used,
        )

    def view_tokens(self, images: torch.Tensor, prefix: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Backbone tokens of every view: per layer (K, B, C, h, w), and the prefix tokens per layer
        (K, B, P, C) when asked for. Views go through the backbone ``view_batch`` images at a time,
        by the fused path (``impl``) or as shifted images; ``views_used`` records which ("fused"
        only where the patch-embedding kernel ran)."""
        fused = self._use_fused_views(images)

        def run_views(shifts: list[tuple[int, int]]):
            if fused:
                return self.fused_views.run(images, shifts, self.padding, self.layers, prefix)
            with precision(images.device, self.dtype):
                return self.backbone(shift_images(images, shifts, self.padding), self.layers, return_prefix=prefix)

        views, batch = len(self.shifts), images.shape[0]
        views_per_call = max(1, self._view_batch(images, prefix, fused) // batch)
        tokens, prefixes = [], []  # per layer (K, B, ...), filled chunk by chunk: no second copy
        for start in range(0, views, views_per_call):
            shifts = self.shifts[start : start + views_per_call]
            out = run_views(shifts)
            for i, layer_tokens in enumerate(out.tokens):
                chunk = layer_tokens.unflatten(0, (len(shifts), batch))
                if start == 0:
                    tokens.append(chunk.new_empty((views, *chunk.shape[1:])))
                tokens[i][start : start + len(shifts)] = chunk
                if prefix:
                    chunk = out.prefix[i].unflatten(0, (len(shifts), batch))
                    if start == 0:
                        prefixes.append(chunk.new_empty((views, *chunk.shape[1:])))
                    prefixes[i][start : start + len(shifts)] = chunk
        kernel_ran = fused and self.fused_views.embedding_used == "kernel"
        self.views_used = "fused" if kernel_ran else "reference"
        return tokens, prefixes

    def _use_fused_views(self, images: torch.Tensor) -> bool:
        if self.impl in ("reference", "chunked") or (self.impl == "auto" and not (images.is_cuda and _triton.load() is not None)):
            return False
        if self.fused_views is None:
            unsupported = fused_views_unsupported(self.backbone)
            if unsupported:
                if self.impl == "fused":
                    warn_once(f"impl='fused': {unsupported}; its views run the reference path")
                return False
            self.fused_views = FusedViews(self.backbone, self.dtype, self.compile, self.cuda_graph)
        return True

    def _view_batch(self, images: torch.Tensor, prefix: bool, fused: bool) -> int:
        """``view_batch``, or for "auto" the images per call that fit the free GPU memory (measured
        once per image shape, dtype and path)."""
        if self.view_batch != "auto":
            return self.view_batch
        key = (tuple(images.shape), images.dtype, images.device, fused, prefix)
        if key not in self._auto_view_batch:
            if fused:
                probe = lambda n: self.fused_views.eager(images, self.shifts[:n], self.padding, self.layers, prefix,  # noqa: E731
                                                         compiled=False)
            else:
                probe = lambda n: self.backbone(shift_images(images, self.shifts[:n], self.padding), self.layers, prefix)  # noqa: E731
            h, w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
            channels = getattr(self.backbone, "embed_dim", 1024)  # a callable's width is unknown: a generous guess
            kept = 4 * len(self.layers) * channels * (h * w + self.backbone.num_prefix_tokens)  # float32 token grids
            with precision(images.device, self.dtype):
                copies = 2 if fused and self.cuda_graph else 1
                self._auto_view_batch[key] = auto_view_batch(probe, len(self.shifts), images.shape[0], kept,
                                                             images.device, activation_copies=copies)
        return self._auto_view_batch[key]
