"""SRT, the Stochastic Resonance Transformer (Lao et al., ICML 2024).

Run the ViT on sub-token-shifted copies of the image, upsample each view's token grid to pixels,
undo the shift, and aggregate over views into a pixel-resolution feature field (docs/method.md,
"SRT").
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from fastsrt.backbone import BackboneOutput, Layers, as_backbone
from fastsrt.backbone_fused import (
    DTYPES,
    FusedViews,
    auto_view_batch,
    fused_views_unsupported,
    precision,
)
from fastsrt.checks import check_choice
from fastsrt.dispatch import Implementation, choose
from fastsrt.ops.patch_embed import FUSED_KERNEL
from fastsrt.ops.shift import check_shifts_fit, shift_images
from fastsrt.ops.warp_aggregate import warp_aggregate
from fastsrt.options import OUTPUTS, PADDINGS, REDUCES, SRT_IMPLS, UPSAMPLES
from fastsrt.views import anytime_order, as_shifts, is_grid

TokenTransform = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class SRTOutput:
    """features: (B, C, H, W) for output="pixel", (B, C, H/p, W/p) for "token"; a list of those,
    one per layer, when several layers were asked for. std: the same shapes, the per-pixel
    standard deviation across views (the paper's noise map), when asked for. prefix: (B, P, C),
    the prefix tokens (CLS, registers) averaged over views, when asked for (a list per layer too).
    views_impl, aggregation_impl: what ran for the views ("fused" or "reference") and for the
    aggregation ("fused", "chunked" or "reference"); ``impl`` says both in one string. views_done: how
    many views (the first of ``SRT.shifts``) the result aggregates: all of them unless ``max_views`` or
    ``budget_ms`` stopped early."""

    features: torch.Tensor | list[torch.Tensor]
    std: torch.Tensor | list[torch.Tensor] | None = None
    prefix: torch.Tensor | list[torch.Tensor] | None = None
    views_impl: str = ""
    aggregation_impl: str = ""
    views_done: int = 0

    @property
    def impl(self) -> str:
        """One name where views and aggregation agree ("fused"), else both ("reference views +
        chunked aggregation")."""
        if self.views_impl == self.aggregation_impl:
            return self.views_impl
        return f"{self.views_impl} views + {self.aggregation_impl} aggregation"


class ViewTokens(NamedTuple):
    """tokens: per layer (K, B, C, h, w) for the K views done (the first K of ``SRT.shifts``);
    prefix: per layer (K, B, P, C) when asked for, else empty; impl: what made them ("fused" or
    "reference")."""

    tokens: list[torch.Tensor]
    prefix: list[torch.Tensor]
    impl: str


class ReferenceViews(Implementation):
    """The views as shifted images through the backbone."""

    name = "reference"

    def __init__(self, backbone: nn.Module, padding: str, dtype: torch.dtype | None):
        self.backbone, self.padding, self.dtype = backbone, padding, dtype

    def __call__(self, images, shifts, layers, prefix, probe=False) -> BackboneOutput:
        with precision(images.device, self.dtype):
            return self.backbone(shift_images(images, shifts, self.padding), layers, return_prefix=prefix)


class FusedEmbeddingViews(Implementation):
    """The views' patch embeddings from the fused kernel, the rest of the ViT through timm's own
    modules (fastsrt.backbone_fused.FusedViews, made on first use)."""

    name = "fused"
    auto_devices = frozenset({"cuda"})
    fallback = "reference"

    def __init__(self, backbone: nn.Module, padding: str, dtype: torch.dtype | None, compile: bool, cuda_graph: bool):
        self.backbone, self.padding, self.dtype = backbone, padding, dtype
        self.compile, self.cuda_graph = compile, cuda_graph
        self.fused_views: FusedViews | None = None

    def not_supported_reasons(self, images, shifts, layers, prefix, probe=False) -> list[str]:
        unsupported = fused_views_unsupported(self.backbone)
        if unsupported is not None:
            return [unsupported]
        return FUSED_KERNEL.not_supported_reasons(images, shifts, self.backbone.model.patch_embed, self.padding,
                                                  self.dtype or images.dtype)

    def __call__(self, images, shifts, layers, prefix, probe=False) -> BackboneOutput:
        """probe: a one-off call (measuring memory), without CUDA graph or compiling a new shape."""
        if self.fused_views is None:
            self.fused_views = FusedViews(self.backbone, self.dtype, self.compile, self.cuda_graph)
        if probe:
            return self.fused_views.eager(images, shifts, self.padding, layers, prefix, compiled=False)
        return self.fused_views.run(images, shifts, self.padding, layers, prefix)


class SRT(nn.Module):
    """Stochastic Resonance Transformer around a backbone.

    Args:
        model: a timm ViT, a timm model name (pretrained weights), a fastsrt Backbone, or a
            callable images -> token grids (then ``patch_size`` is required).
        shifts: an int d -> the paper's grid, the identity view plus every (dy, dx) with
            |dy|, |dx| <= d (1 + (2d+1)^2 views; d=3 gives the authors' 50); or a sequence of
            (dy, dx) int pairs, duplicates allowed. View convention: view(y, x) = image(y-dy, x-dx).
            A grid (an int, or exactly ``paper_grid(d)`` / ``grid(d)``) runs in the anytime order
            (``fastsrt.views.anytime_order``): every prefix covers the sub-token offsets evenly, so
            that stopping early (``max_views``, ``budget_ms``) gives a result close to the full one;
            explicit pairs otherwise run in their order. ``self.shifts``: the views in running order.
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
            (fastsrt.ops.warp_aggregate); where the views cannot run so (not a timm
            VisionTransformer/Eva, a patch embedding that is not a plain convolution, no Triton
            or GPU, a dtype the kernel does not write) they run the reference path, and where the
            aggregation cannot the "chunked" one, each with one warning. "chunked" makes the views
            as shifted images and aggregates with the memory-efficient torch path. "auto" is
            "fused" on CUDA, "chunked" elsewhere. ``run`` returns what ran (``SRTOutput.impl``).
        view_batch: images per backbone forward (views x batch), bounding memory; "auto" fits
            the free GPU memory (measured on the first call per image size), 32 on CPU.
        dtype: None/float32, or bfloat16/float16 for mixed precision (autocast) in the backbone.
        compile: torch.compile the backbone blocks of the fused path.
        cuda_graph: capture the fused path's backbone calls as CUDA graphs (fixed shapes, CUDA).
        pad_to_patch: pad image sides to a multiple of the patch instead of raising; pixel
            output is cropped back to the input size.
        token_transform: None, or a callable (an nn.Module is registered as a submodule, so that
            ``.to()`` moves it) applied to the views' token grids before the aggregation: each
            backbone call's chunk of views, per layer, (N, C, h, w) -> (N, C', h, w) with N = views
            in the chunk x batch (view-major). It sees the grids as the backbone gives them (in
            ``dtype`` under mixed precision), not the prefix tokens. E.g. a DVT denoiser
            (fastsrt.DVT with ``shifts``: every view denoised, then aggregated).
        max_views: None (every view), or run only the first ``max_views`` of ``shifts`` (all of them
            when there are fewer).
        budget_ms: None, or a time budget in milliseconds for the views of one ``run``: views run in
            chunks of ``view_batch`` images, and a further chunk starts only while the time spent
            plus the last chunk's time per view times the next chunk's views fits the budget; the
            first chunk always runs. Wall time on a CPU; on a GPU with a CUDA synchronisation at
            each chunk's end. The aggregation after the views is not counted. With either option
            the result aggregates (mean, median, std, ignore_padding) the views done, and
            ``SRTOutput.views_done`` says how many.
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
        token_transform: TokenTransform | None = None,
        max_views: int | None = None,
        budget_ms: float | None = None,
    ):
        super().__init__()
        check_choice("upsample", upsample, UPSAMPLES)
        check_choice("padding", padding, PADDINGS)
        check_choice("reduce", reduce, REDUCES)
        check_choice("output", output, OUTPUTS)
        check_choice("impl", impl, SRT_IMPLS)
        check_choice("dtype", dtype, DTYPES)
        if view_batch != "auto" and (isinstance(view_batch, bool) or not isinstance(view_batch, int) or view_batch < 1):
            raise ValueError(f"view_batch must be an int >= 1 or 'auto', got {view_batch!r}")
        if max_views is not None and (isinstance(max_views, bool) or not isinstance(max_views, int) or max_views < 1):
            raise ValueError(f"max_views must be None or an int >= 1, got {max_views!r}")
        if budget_ms is not None and (isinstance(budget_ms, bool) or not isinstance(budget_ms, (int, float))
                                      or not math.isfinite(budget_ms) or budget_ms < 0):
            raise ValueError(f"budget_ms must be None or a finite number of milliseconds >= 0, got {budget_ms!r}")
        if token_transform is not None and not callable(token_transform):
            raise TypeError(f"token_transform must be callable, got {type(token_transform).__name__}")
        self.backbone = as_backbone(model, patch_size=patch_size, pretrained=pretrained, pad_to_patch=pad_to_patch)
        self.layers = self.backbone.layer_indices(layer)  # validates
        self.layer = layer
        self.shifts = as_shifts(shifts)
        if is_grid(self.shifts):
            self.shifts = anytime_order(self.shifts, self.patch_size)
        self.max_views, self.budget_ms = max_views, budget_ms
        self.upsample, self.padding, self.reduce = upsample, padding, reduce
        self.ignore_padding, self.output, self.impl = ignore_padding, output, impl
        self.view_batch = view_batch
        self.dtype = dtype
        self.compile, self.cuda_graph = compile, cuda_graph
        self.token_transform = token_transform
        # the two ways of making the views, in order of preference for impl="auto"
        self.view_paths = (FusedEmbeddingViews(self.backbone, padding, dtype, compile, cuda_graph),
                           ReferenceViews(self.backbone, padding, dtype))
        self._auto_view_batch: dict[tuple, int] = {}

    @property
    def patch_size(self) -> int:
        return self.backbone.patch_size

    def forward(self, images: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        return self.run(images).features

    @torch.no_grad()
    def run(self, images: torch.Tensor, std: bool = False, prefix: bool = False) -> SRTOutput:
        """The SRT features of a batch of normalised images (B, 3, H, W), optionally with the
        per-pixel standard deviation across views and the view-averaged prefix tokens, and what
        ran. Runs without gradients."""
        padded = self.backbone.prepare(images)  # validates images
        size = images.shape[-2:]
        check_shifts_fit(self.shifts, *size)
        views = self.view_tokens(padded, prefix)
        done = views.tokens[0].shape[0]
        features, stds = [], []
        for layer_tokens in views.tokens:
            aggregate, deviation, aggregation_impl = warp_aggregate(
                layer_tokens, self.shifts[:done], self.patch_size, self.upsample, self.reduce,
                self.ignore_padding, self.output, return_std=std, impl=self.impl,
            )
            if self.output == "pixel":  # drop the padding of pad_to_patch
                aggregate = self.backbone.crop(aggregate, size)
                deviation = self.backbone.crop(deviation, size) if std else None
            features.append(aggregate)
            stds.append(deviation)
        single = not isinstance(self.layer, (list, tuple))
        pick = (lambda values: values[0]) if single else (lambda values: values)
        return SRTOutput(
            features=pick(features),
            std=pick(stds) if std else None,
            prefix=pick([p.mean(0) for p in views.prefix]) if prefix else None,
            views_impl=views.impl,
            aggregation_impl=aggregation_impl,
            views_done=done,
        )

    @property
    def views_to_run(self) -> int:
        """The views a run takes at most: all of ``shifts``, or the first ``max_views``."""
        return min(len(self.shifts), self.max_views or len(self.shifts))

    def view_tokens(self, images: torch.Tensor, prefix: bool = False) -> ViewTokens:
        """Backbone tokens of the views of a batch (sides a multiple of the patch), after
        ``token_transform``: every view, or the first ones as ``max_views`` and ``budget_ms`` allow.
        Views go through the backbone ``view_batch`` images at a time, by the fused path or as
        shifted images (``impl``; fastsrt.dispatch chooses)."""
        paths_impl = "reference" if self.impl == "chunked" else self.impl
        path = choose("SRT views", self.view_paths, paths_impl, images.device.type, images, self.shifts,
                      self.layers, prefix)
        views, batch = self.views_to_run, images.shape[0]
        views_per_call = max(1, self._view_batch(images, prefix, path) // batch)
        budget = _Budget(self.budget_ms, images.device)
        tokens, prefixes = [], []  # per layer (K, B, ...), filled chunk by chunk: no second copy
        for start in range(0, views, views_per_call):
            shifts = self.shifts[start : min(start + views_per_call, views)]
            if start > 0 and not budget.fits(len(shifts)):
                return ViewTokens([t[:start] for t in tokens], [p[:start] for p in prefixes], path.name)
            out = self._views(path, images, shifts, prefix)
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
            budget.chunk_done(len(shifts))
        return ViewTokens(tokens, prefixes, path.name)

    def _views(self, path: Implementation, images, shifts, prefix: bool, probe: bool = False) -> BackboneOutput:
        """One backbone call's views by ``path``, their token grids through ``token_transform``."""
        out = path(images, shifts, self.layers, prefix, probe)
        if self.token_transform is None:
            return out
        return BackboneOutput([self._transform(grids) for grids in out.tokens], out.prefix)

    def _transform(self, grids: torch.Tensor) -> torch.Tensor:
        out = self.token_transform(grids)
        if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[0] != grids.shape[0] \
                or out.shape[-2:] != grids.shape[-2:]:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"token_transform must map token grids {tuple(grids.shape)} to (N, C, h, w) grids "
                             f"of the same N, h, w, got {got}")
        return out

    def _view_batch(self, images: torch.Tensor, prefix: bool, path: Implementation) -> int:
        """``view_batch``, or for "auto" the images per call that fit the free GPU memory (measured
        once per image shape, dtype and path)."""
        if self.view_batch != "auto":
            return self.view_batch
        key = (tuple(images.shape), images.dtype, images.device, path.name, prefix)
        if key not in self._auto_view_batch:
            h, w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
            channels = getattr(self.backbone, "embed_dim", 1024)  # a callable's width is unknown: a generous guess
            kept = 4 * len(self.layers) * channels * (h * w + self.backbone.num_prefix_tokens)  # float32 token grids
            copies = 2 if path.name == "fused" and self.cuda_graph else 1
            self._auto_view_batch[key] = auto_view_batch(
                lambda n: self._views(path, images, self.shifts[:n], prefix, probe=True), len(self.shifts),
                images.shape[0], kept, images.device, activation_copies=copies)
        return self._auto_view_batch[key]


class _Budget:
    """The time budget of one run's views (``SRT.budget_ms``; None: unlimited): whether a further chunk
    of views fits, judged from the time spent so far and the last chunk's time per view. On a GPU each
    chunk's end is a CUDA synchronisation, so that the time is the device's."""

    def __init__(self, budget_ms: float | None, device: torch.device):
        self.seconds = None if budget_ms is None else budget_ms / 1000
        self.device = device
        if self.seconds is not None and device.type == "cuda":  # the work queued before this run is not its own
            torch.cuda.synchronize(device)
        self.start = self.last_end = time.perf_counter()
        self.per_view = 0.0

    def chunk_done(self, views: int) -> None:
        if self.seconds is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.per_view = (now - self.last_end) / views
        self.last_end = now

    def fits(self, views: int) -> bool:
        return self.seconds is None or self.last_end - self.start + self.per_view * views <= self.seconds
