"""The semantics of warp_aggregate, in plain torch: argument checks, the upsampling, the frame
and the inverse shift, and ``warp_aggregate_reference``, which materialises every warped view
(K x B x C x H x W) and defines what the fast paths are tested against.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import wraps

import torch
import torch.nn.functional as F

from fastsrt.checks import check_choice
from fastsrt.options import OUTPUTS, REDUCES, UPSAMPLES


def check_warp_aggregate_args(tokens, shifts, patch_size, upsample, reduce, output) -> None:
    check_choice("upsample", upsample, UPSAMPLES)
    check_choice("reduce", reduce, REDUCES)
    check_choice("output", output, OUTPUTS)
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 5:
        got = getattr(tokens, "shape", type(tokens))
        raise ValueError(f"tokens must be a tensor of shape (K, B, C, h, w), got {got}")
    if not tokens.is_floating_point():
        raise TypeError(f"tokens must be a floating-point tensor, got dtype {tokens.dtype}")
    if len(shifts) != tokens.shape[0]:
        raise ValueError(f"{len(shifts)} shifts for {tokens.shape[0]} views")
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")


def checks_arguments(implementation):
    """The public form of an implementation: checks the arguments, then runs it. The dispatcher,
    which checks them once itself, runs ``implementation`` (the wrapper's ``__wrapped__``)."""

    @wraps(implementation)
    def checked(tokens, shifts, patch_size, upsample="nearest", reduce="mean", ignore_padding=False, output="pixel",
                return_std=False):
        check_warp_aggregate_args(tokens, shifts, patch_size, upsample, reduce, output)
        return implementation(tokens, shifts, patch_size, upsample, reduce, ignore_padding, output, return_std)

    return checked


def upsample_tokens(tokens: torch.Tensor, patch_size: int, mode: str) -> torch.Tensor:
    """(N, C, h, w) -> (N, C, p*h, p*w)."""
    if mode == "nearest":
        return tokens.repeat_interleave(patch_size, dim=-2).repeat_interleave(patch_size, dim=-1)
    return F.interpolate(tokens, scale_factor=patch_size, mode="bilinear", align_corners=False)


def frame_inside(size: int, shift: int, device) -> torch.Tensor:
    """Positions i in [0, size) whose source i + shift lies in the frame [0, size)."""
    source = torch.arange(size, device=device) + shift
    return (source >= 0) & (source < size)


def frame_mask(height: int, width: int, dy: int, dx: int, device) -> torch.Tensor:
    """(height, width): the pixels whose source (y + dy, x + dx) lies in the frame."""
    return frame_inside(height, dy, device)[:, None] & frame_inside(width, dx, device)[None, :]


def inverse_shift(pixels: torch.Tensor, dy: int, dx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W(y, x) = pixels(y + dy, x + dx): returns W (0 where empty) and the (H, W) inside mask."""
    height, width = pixels.shape[-2:]
    inside = frame_mask(height, width, dy, dx, pixels.device)
    rows = (torch.arange(height, device=pixels.device) + dy).clamp(0, height - 1)
    cols = (torch.arange(width, device=pixels.device) + dx).clamp(0, width - 1)
    warped = pixels[..., rows[:, None], cols[None, :]]
    return torch.where(inside, warped, torch.zeros((), dtype=pixels.dtype, device=pixels.device)), inside


@checks_arguments
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


def empty_output(shape: tuple[int, ...], tokens: torch.Tensor) -> torch.Tensor:
    """An uninitialised output buffer (the fast paths write every element; tests poison it)."""
    return torch.empty(shape, dtype=tokens.dtype, device=tokens.device)


def output_shape(tokens: torch.Tensor, patch_size: int, output: str) -> tuple[int, int, int, int]:
    """(B, C, H, W) for output="pixel", (B, C, h, w) for output="token"."""
    _, batch, channels, h, w = tokens.shape
    scale = 1 if output == "token" else patch_size
    return batch, channels, h * scale, w * scale
