"""fastsrt.DVT: a backbone followed by the distilled denoiser, clean token grids in one forward;
optionally upsampled to pixels, or combined with SRT (each shifted view denoised, then aggregated:
SRT with the denoiser as its ``token_transform``)."""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from fastsrt.backbone import as_backbone, model_name
from fastsrt.checks import check_choice
from fastsrt.dvt.denoiser import Denoiser, same_backbone
from fastsrt.ops.warp_aggregate import upsample_tokens
from fastsrt.options import OUTPUTS, UPSAMPLES
from fastsrt.srt import SRT


class DVT(nn.Module):
    """Denoising ViT pipeline.

    Args:
        model: a timm ViT, a timm model name, a fastsrt Backbone, or a callable images -> token
            grids (then ``patch_size`` is required).
        denoiser: a fastsrt.dvt.Denoiser or the path of a checkpoint (fastsrt's or the authors').
        layer: the block whose tokens are denoised (default: the one the denoiser was trained on).
        output: "token" -> (B, C, h, w); "pixel" -> (B, C, H, W), upsampled by the patch size.
        upsample: "nearest" or "bilinear", for pixel output and for the SRT aggregation.
        shifts: None for a single forward; an SRT view schedule (int d or (dy, dx) pairs) to
            denoise every shifted view and aggregate them as SRT does (``padding``, ``reduce``,
            ``ignore_padding``, ``view_batch`` and ``impl`` as in fastsrt.SRT).
    """

    def __init__(
        self,
        model,
        denoiser: Denoiser | str | os.PathLike,
        layer: int | None = None,
        output: str = "token",
        upsample: str = "nearest",
        shifts: int | Sequence[Sequence[int]] | None = None,
        padding: str = "zeros",
        reduce: str = "mean",
        ignore_padding: bool = False,
        view_batch: int = 32,
        impl: str = "auto",
        patch_size: int | None = None,
        pad_to_patch: bool = False,
        pretrained: bool | str = True,
    ):
        super().__init__()
        check_choice("output", output, OUTPUTS)
        check_choice("upsample", upsample, UPSAMPLES)
        self.backbone = as_backbone(model, patch_size=patch_size, pretrained=pretrained, pad_to_patch=pad_to_patch)
        name = model_name(self.backbone)
        if not isinstance(denoiser, Denoiser):
            denoiser = Denoiser.load(denoiser, backbone=name)
        if not same_backbone(denoiser.backbone, name):
            raise ValueError(f"the denoiser was trained on {denoiser.backbone}, not on {name}")
        channels = getattr(self.backbone, "embed_dim", denoiser.dim)
        if channels != denoiser.dim:
            raise ValueError(f"the denoiser takes {denoiser.dim}-channel tokens but {name or 'the model'} "
                             f"gives {channels}")
        self.denoiser = denoiser
        self.layer = denoiser.layer if layer is None else layer
        if not isinstance(self.layer, int):
            raise ValueError(f"DVT takes one layer, got {self.layer!r}")
        self.backbone.layer_indices(self.layer)  # validates
        self.output, self.upsample = output, upsample
        self.srt = None
        if shifts is not None:  # SRT denoising every view before it aggregates them
            self.srt = SRT(self.backbone, shifts, layer=self.layer, upsample=upsample, padding=padding, reduce=reduce,
                           ignore_padding=ignore_padding, output=output, impl=impl, view_batch=view_batch,
                           token_transform=denoiser)

    @property
    def patch_size(self) -> int:
        return self.backbone.patch_size

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Clean features of normalised images (B, 3, H, W): (B, C, h, w) tokens or (B, C, H, W)
        pixels (see ``output``). Runs without gradients."""
        if self.srt is not None:
            return self.srt(images)
        clean = self.denoiser(self.backbone(self.backbone.prepare(images), self.layer).tokens[0])
        if self.output == "token":
            return clean
        return self.backbone.crop(upsample_tokens(clean, self.patch_size, self.upsample), images.shape[-2:])
