"""The fused shift + patchify + patch-embedding op: every SRT view's patch embeddings in one pass,
straight from the unshifted images (reference.py says what it computes; kernels.py is the Triton
kernel, imported only when it first runs; dispatch.py chooses between them)."""
from fastsrt.ops.patch_embed.dispatch import (
    FUSED_KERNEL,
    IMPLEMENTATIONS,
    IMPLS,
    ShiftPatchEmbedOutput,
    embed_views,
    shift_patch_embed,
)
from fastsrt.ops.patch_embed.fused import OUT_DTYPES, shift_patch_embed_triton
from fastsrt.ops.patch_embed.reference import (
    ConvWeights,
    check_patch_embed_args,
    conv_weights,
    plain_conv_weights,
    shift_patch_embed_reference,
    token_layout,
)

__all__ = [
    "FUSED_KERNEL",
    "IMPLEMENTATIONS",
    "IMPLS",
    "OUT_DTYPES",
    "ConvWeights",
    "ShiftPatchEmbedOutput",
    "check_patch_embed_args",
    "conv_weights",
    "embed_views",
    "plain_conv_weights",
    "shift_patch_embed",
    "shift_patch_embed_reference",
    "shift_patch_embed_triton",
    "token_layout",
]
