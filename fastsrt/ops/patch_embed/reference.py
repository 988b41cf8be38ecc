"""Shift + patchify + patch-embedding projection of every SRT view: what it computes, the torch
reference and the argument checks.

For view k (shift (dy, dx)) of image b, token (ty, tx) and embedding channel d:
    E[k*B + b, ty, tx, d] = bias[d] + sum_{c, py, px} weight[d, c, py, px] * V_k[b, c, ty*p + py, tx*p + px]
where V_k = shift_images(images, [shifts[k]], padding) (fastsrt.ops.shift). That is a timm patch
embedding that is a plain strided convolution (kernel = stride = p, no norm) applied to the shifted
views, written as the matrix product  patches (K*B*h*w, C*p*p) @ weight.reshape(D, C*p*p)^T.
Output rows are view-major like shift_images.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fastsrt.checks import check_choice, check_images
from fastsrt.ops.shift import check_shifts_fit, shift_images
from fastsrt.options import PADDINGS


class ConvWeights(NamedTuple):
    """A patch embedding that is a plain strided convolution: weight (D, C, p, p), bias (D,) or None."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    patch_size: int


def plain_conv_weights(patch_embed: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | str:
    """(weight (D, C, p, p), bias (D,) or None) of a timm PatchEmbed that is a plain strided
    convolution without norm, else the reason it is not (a string)."""
    from timm.layers import PatchEmbed

    if type(patch_embed) is not PatchEmbed:
        return f"its patch embedding is a {type(patch_embed).__name__}, not a plain timm PatchEmbed"
    proj = patch_embed.proj
    if type(proj) is not nn.Conv2d:
        return f"its patch projection is a {type(proj).__name__}, not an nn.Conv2d"
    if not isinstance(patch_embed.norm, nn.Identity):
        return f"its patch embedding has a {type(patch_embed.norm).__name__} after the projection"
    kernel = tuple(proj.kernel_size)
    if kernel[0] != kernel[1] or tuple(proj.stride) != kernel or tuple(proj.padding) != (0, 0) \
            or tuple(proj.dilation) != (1, 1) or proj.groups != 1:
        return (f"its patch projection is not a plain strided convolution (kernel {kernel}, stride "
                f"{tuple(proj.stride)}, padding {proj.padding}, dilation {proj.dilation}, groups {proj.groups})")
    return proj.weight, proj.bias


def conv_weights(embedding: ConvWeights | nn.Module) -> ConvWeights | str:
    """The convolution of a patch embedding given as ConvWeights or as a timm PatchEmbed (looked up
    at each call, so that it follows ``.to()``), else the reason it is not a plain one."""
    if isinstance(embedding, ConvWeights):
        return embedding
    found = plain_conv_weights(embedding)
    if isinstance(found, str):
        return found
    return ConvWeights(*found, embedding.proj.kernel_size[0])


def token_layout(patch_embed: nn.Module) -> str:
    """The layout of a timm patch embedding's output: "NLC" (flattened tokens), "NHWC" (dynamic
    image size models), or another format, such as "NCHW", that is not tokens."""
    if getattr(patch_embed, "flatten", False):
        return "NLC"
    layout = getattr(patch_embed, "output_fmt", "NCHW")
    return getattr(layout, "value", str(layout))  # timm's Format enum, or a plain string


def check_patch_embed_args(images, shifts, weight, bias, patch_size, padding) -> None:
    check_choice("padding", padding, PADDINGS)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 \
            or tuple(weight.shape[-2:]) != (patch_size, patch_size):
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must have shape (D, C, {patch_size}, {patch_size}), got {got}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    check_images(images, weight.shape[1], min_size=patch_size)
    height, width = images.shape[-2:]
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {patch_size}")
    if len(shifts) == 0:
        raise ValueError("shifts must hold at least one (dy, dx) pair")
    check_shifts_fit(shifts, height, width)


def shift_patch_embed_reference(
    images: torch.Tensor,
    shifts: Sequence[tuple[int, int]],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    patch_size: int,
    padding: str = "zeros",
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Patch embeddings of all views, (K*B, h, w, D), computed by materialising the shifted views
    and their unfolded patches. Computes in float32 at least (float64 stays float64)."""
    check_patch_embed_args(images, shifts, weight, bias, patch_size, padding)
    return embed_reference(images, shifts, ConvWeights(weight, bias, patch_size), padding, out_dtype)


def embed_reference(images: torch.Tensor, shifts: Sequence[tuple[int, int]], conv: ConvWeights, padding: str,
                    out_dtype: torch.dtype | None) -> torch.Tensor:
    """``shift_patch_embed_reference`` without its checks."""
    weight, bias, patch_size = conv
    compute = torch.promote_types(images.dtype, torch.float32)
    views = shift_images(images.to(compute), shifts, padding)  # (K*B, C, H, W)
    h, w = views.shape[-2] // patch_size, views.shape[-1] // patch_size
    patches = F.unfold(views, patch_size, stride=patch_size).transpose(1, 2)  # (K*B, h*w, C*p*p), (c, py, px) order
    embeddings = patches @ weight.reshape(weight.shape[0], -1).to(compute).T
    if bias is not None:
        embeddings = embeddings + bias.to(compute)
    return embeddings.unflatten(1, (h, w)).to(out_dtype or images.dtype)
