"""Inverse-warp upsample + aggregation over views: the second half of SRT (reference path).

For view k with shift (dy, dx) and token grid T_k (C, h, w) of a (p*h) x (p*w) image:
    U_k = upsample(T_k, p)                                  nearest, or bilinear as
                                                            F.interpolate(align_corners=False)
    W_k(y, x) = U_k(y + dy, x + dx)   where inside the frame, else empty (the inverse shift)
    out(y, x) = reduce over k of W_k(y, x)
``ignore_padding=False`` (the SRT paper) counts empty pixels as 0 and reduces over all K views;
``ignore_padding=True`` reduces over the views in which the pixel is inside the frame only
(a pixel inside none is 0). ``reduce`` is "mean" or "median" (the lower middle value for an even
count, like torch.median). The optional standard deviation is the population one (divide by the
count) around the mean, over the same values. ``output="token"`` average-pools the result with
kernel = stride = p, as the authors do.

This reference materialises every warped view (K x B x C x H x W); it defines the semantics
that the memory-efficient paths are tested against.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fastsrt.checks import check_choice

UPSAMPLES = ("nearest", "bilinear")
REDUCES = ("mean", "median")
OUTPUTS = ("pixel", "token")


def check_warp_aggregate_args(tokens, shifts, patch_size, upsample, reduce, output) -> None:
    check_choice("upsample", upsample, UPSAMPLES)
    check_choice("reduce", reduce, REDUCES)
    check_choice("output", output, OUTPUTS)
    if tokens.dim() != 5:
        raise ValueError(f"tokens must have shape (K, B, C, h, w), got {tuple(tokens.shape)}")
    if len(shifts) != tokens.shape[0]:
        raise ValueError(f"{len(shifts)} shifts for {tokens.shape[0]} views")
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")


def upsample_tokens(tokens: torch.Tensor, patch_size: int, mode: str) -> torch.Tensor:
    """(N, C, h, w) -> (N, C, p*h, p*w)."""
    if mode == "nearest":
        return tokens.repeat_interleave(patch_size, dim=-2).repeat_interleave(patch_size, dim=-1)
    return F.interpolate(tokens, scale_factor=patch_size, mode="bilinear", align_corners=False)


def inverse_shift(pixels: torch.Tensor, dy: int, dx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W(y, x) = pixels(y + dy, x + dx): returns W (0 where empty) and the (H, W) inside mask."""
    height, width = pixels.shape[-2:]
    rows = torch.arange(height, device=pixels.device) + dy
    cols = torch.arange(width, device=pixels.device) + dx
    inside = ((rows >= 0) & (rows < height))[:, None] & ((cols >= 0) & (cols < width))[None, :]
    warped = pixels[..., rows.clamp(0, height - 1)[:, None], cols.clamp(0, width - 1)[None, :]]
    return torch.where(inside, warped, torch.zeros((), dtype=pixels.dtype, device=pixels.device)), inside


def warp_aggregate_reference(
    tokens: torch.Tensor,
    shifts: Sequence[tuple[int, int]],
    patch_size: int,
    upsample: str = "nearest",
    reduce: str = "mean",
    ignore_padding: bool = False,
    output: str = "pixel",
    return_std: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """tokens (K, B, C, h, w) of K views -> (aggregate, std or None), each (B, C, H, W) for
    output="pixel" or (B, C, h, w) for output="token". Computes in float32 at least (float64 stays
    float64) and returns the tokens' dtype."""
    check_warp_aggregate_args(tokens, shifts, patch_size, upsample, reduce, output)
    views, batch, channels, h, w = tokens.shape
    compute = tokens.to(torch.promote_types(tokens.dtype, torch.float32))
    pixels = upsample_tokens(compute.flatten(0, 1), patch_size, upsample).unflatten(0, (views, batch))

    warped, inside = zip(*(inverse_shift(pixels[k], dy, dx) for k, (dy, dx) in enumerate(shifts)))
    warped = torch.stack(warped)  # (K, B, C, H, W)
    inside = torch.stack(inside)[:, None, None]  # (K, 1, 1, H, W)
    if not ignore_padding:
        inside = torch.ones_like(inside)  # empty pixels count as zeros
    count = inside.sum(0)  # (1, 1, H, W)
    covered = count > 0

    mean = warped.sum(0) / count.clamp(min=1)
    if reduce == "mean":
        result = mean
    else:
        # lower middle of the values inside: sort with the empty ones last
        ordered = torch.where(inside, warped, torch.tensor(float("inf"), dtype=warped.dtype)).sort(dim=0).values
        middle = ((count - 1) // 2).clamp(min=0).expand(batch, channels, -1, -1)
        result = torch.where(covered, ordered.gather(0, middle[None]).squeeze(0), 0.0)
    std = None
    if return_std:
        deviation = torch.where(inside, warped - mean, 0.0)
        std = ((deviation**2).sum(0) / count.clamp(min=1)).sqrt()

    if output == "token":
        result = F.avg_pool2d(result, patch_size)
        std = F.avg_pool2d(std, patch_size) if std is not None else None
    return result.to(tokens.dtype), (std.to(tokens.dtype) if std is not None else None)
