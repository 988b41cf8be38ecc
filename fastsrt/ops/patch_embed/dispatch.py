"""Which implementation embeds the shifted views (fastsrt.dispatch), and the public op.

The patch embedding is given either as ``ConvWeights`` (``shift_patch_embed``) or as a model's
``patch_embed`` module (``embed_views``, for fastsrt.backbone_fused). In order of preference:
- "fused": the Triton kernel; a plain strided-conv embedding, on CUDA (or CPU tensors under
  TRITON_INTERPRET=1), writing float32, bfloat16 or float16. Falls back to "reference".
- "reference": the same convolution in torch, on materialised shifted views and patches. Falls
  back to "patch_embed".
- "patch_embed": the model's own module on the shifted images, for embeddings that are not a plain
  convolution (a norm after the projection, overlapping patches...).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from fastsrt.dispatch import Implementation, choose, names
from fastsrt.ops import _triton
from fastsrt.ops.patch_embed.fused import OUT_DTYPES, shift_patch_embed_triton
from fastsrt.ops.patch_embed.reference import (
    ConvWeights,
    check_patch_embed_args,
    conv_weights,
    embed_reference,
    token_layout,
)
from fastsrt.ops.shift import shift_images

Embedding = ConvWeights | nn.Module


class ShiftPatchEmbedOutput(NamedTuple):
    """embeddings: (K*B, h, w, D), view-major; impl: the name of what computed them."""

    embeddings: torch.Tensor
    impl: str


class FusedKernel(Implementation):
    """The Triton kernel: reads each patch straight from the unshifted images."""

    name = "fused"
    auto_devices = frozenset({"cuda"})
    fallback = "reference"

    def not_supported_reasons(self, images, shifts, embedding: Embedding, padding, out_dtype, shift_table=None):
        reasons = _triton.not_supported_reasons(images.device)
        conv = conv_weights(embedding)
        if isinstance(conv, str):
            reasons.append(conv)
        if out_dtype not in OUT_DTYPES:
            reasons.append(f"the fused patch embedding writes float32, bfloat16 or float16, not {out_dtype}")
        return reasons

    def __call__(self, images, shifts, embedding: Embedding, padding, out_dtype, shift_table=None):
        weight, bias, patch_size = conv_weights(embedding)
        if shift_table is None:
            shift_table = torch.tensor(shifts, dtype=torch.int32, device=images.device)
        return shift_patch_embed_triton(images, shift_table, weight, bias, patch_size, padding, out_dtype)


class Reference(Implementation):
    """The convolution in torch, on materialised shifted views and their unfolded patches."""

    name = "reference"
    fallback = "patch_embed"

    def not_supported_reasons(self, images, shifts, embedding: Embedding, padding, out_dtype, shift_table=None):
        conv = conv_weights(embedding)
        return [conv] if isinstance(conv, str) else []

    def __call__(self, images, shifts, embedding: Embedding, padding, out_dtype, shift_table=None):
        return embed_reference(images, shifts, conv_weights(embedding), padding, out_dtype)


class ModelPatchEmbed(Implementation):
    """The model's own ``patch_embed`` module on the shifted images, in the dtype it gives."""

    name = "patch_embed"

    def not_supported_reasons(self, images, shifts, embedding: Embedding, padding, out_dtype, shift_table=None):
        if not isinstance(embedding, nn.Module):
            return ["bare convolution weights are no patch_embed module to run"]
        if token_layout(embedding) not in ("NLC", "NHWC"):
            return [f"its patch embedding writes {token_layout(embedding)}, not tokens"]
        return []

    def __call__(self, images, shifts, embedding: Embedding, padding, out_dtype, shift_table=None):
        embeddings = embedding(shift_images(images, shifts, padding))
        if token_layout(embedding) == "NLC":
            h = images.shape[-2] // embedding.patch_size[0]
            embeddings = embeddings.unflatten(1, (h, -1))
        return embeddings


FUSED_KERNEL = FusedKernel()
IMPLEMENTATIONS = (FUSED_KERNEL, Reference(), ModelPatchEmbed())
IMPLS = names(IMPLEMENTATIONS)


def embed_views(images: torch.Tensor, shifts: Sequence[tuple[int, int]], embedding: Embedding, padding: str,
                out_dtype: torch.dtype, impl: str = "auto", shift_table: torch.Tensor | None = None,
                ) -> ShiftPatchEmbedOutput:
    """``shift_patch_embed`` for validated inputs, the embedding given as ConvWeights or as a
    model's patch_embed module. shift_table: the shifts as a (K, 2) int32 tensor on the images'
    device, for the kernel under CUDA-graph capture (no host copy)."""
    chosen = choose("shift_patch_embed", IMPLEMENTATIONS, impl, images.device.type, images, shifts, embedding,
                    padding, out_dtype)
    return ShiftPatchEmbedOutput(chosen(images, shifts, embedding, padding, out_dtype, shift_table), chosen.name)


def shift_patch_embed(
    images: torch.Tensor,
    shifts: Sequence[tuple[int, int]],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    patch_size: int,
    padding: str = "zeros",
    impl: str = "auto",
    out_dtype: torch.dtype | None = None,
) -> ShiftPatchEmbedOutput:
    """Patch embeddings (K*B, h, w, D) of the K shifted views of images (B, C, H, W), H and W
    multiples of patch_size; row k*B + b is image b shifted by shifts[k]. Returns them with the
    name of the implementation that ran.

    impl: "fused" runs the Triton kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1;
    elsewhere it falls back to the reference with one warning), "reference" the torch path,
    "auto" the kernel on CUDA (the reference, with one warning, where Triton is missing) and
    the reference otherwise. out_dtype (default: the images' dtype) also sets the kernel's multiply
    precision: bfloat16/float16 operands with float32 accumulation, or exact float32 (no TF32).
    """
    check_patch_embed_args(images, shifts, weight, bias, patch_size, padding)
    return embed_views(images, shifts, ConvWeights(weight, bias, patch_size), padding, out_dtype or images.dtype, impl)
