"""The timm internals fastsrt relies on, checked directly: a timm release that renames or reshapes one
fails here, with its name, before it shows up as a wrong number in the fused-view parity tests.

fastsrt/backbone_fused.py runs the rest of a ViT from patch embeddings in the order timm's
``forward_intermediates`` does; fastsrt/backbone.py reads the patch embedding's conv; the deploy
export fixes the input size with ``set_input_size``; the DVT denoiser is a timm ``Block`` whose
positional embedding is resampled by ``resample_abs_pos_embed``.
"""
import inspect

import pytest
import timm
import torch
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from utils import tiny_vit

FAMILIES = {
    "VisionTransformer": dict(name="vit_small_patch14_dinov2"),
    "VisionTransformer+registers": dict(name="vit_small_patch14_reg4_dinov2"),
    "Eva": dict(name="eva02_tiny_patch14_224"),
}


def fail(what: str) -> None:
    pytest.fail(f"timm {timm.__version__} changed {what}, which fastsrt relies on: see the timm bound and its "
                "comment in pyproject.toml", pytrace=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_vit_modules_used_by_the_fused_views(family):
    model = tiny_vit(**FAMILIES[family])
    expected_class = Eva if family == "Eva" else VisionTransformer
    if not isinstance(model, expected_class):
        fail(f"the class of {FAMILIES[family]['name']} (now {type(model).__name__})")
    for attribute in ("patch_embed", "_pos_embed", "norm_pre", "blocks", "norm", "num_prefix_tokens",
                      "forward_intermediates", "set_input_size", "embed_dim"):
        if not hasattr(model, attribute):
            fail(f"{type(model).__name__}.{attribute}")
    if not isinstance(model, Eva) and not hasattr(model, "patch_drop"):
        fail("VisionTransformer.patch_drop")
    if isinstance(model, Eva) and not hasattr(model, "rope_mixed"):
        fail("Eva.rope_mixed")
    parameters = inspect.signature(model.forward_intermediates).parameters
    for name in ("indices", "return_prefix_tokens", "norm", "stop_early", "output_fmt", "intermediates_only"):
        if name not in parameters:
            fail(f"forward_intermediates' argument {name!r}")

    patch_embed = model.patch_embed
    if not isinstance(getattr(patch_embed, "proj", None), torch.nn.Conv2d):
        fail("PatchEmbed.proj (a Conv2d)")
    if not (hasattr(patch_embed, "flatten") and hasattr(patch_embed, "output_fmt")):
        fail("PatchEmbed.flatten / output_fmt")

    images = torch.randn(2, 3, 28, 42)
    with torch.no_grad():
        embeddings = patch_embed(images)
        positioned = model._pos_embed(embeddings)
    if isinstance(model, Eva):
        if not (isinstance(positioned, tuple) and len(positioned) == 2):
            fail("Eva._pos_embed's return value (tokens, rope)")
        positioned = positioned[0]
    tokens = 2 * 3 + model.num_prefix_tokens
    if positioned.shape != (2, tokens, model.embed_dim):
        fail(f"_pos_embed's output shape (now {tuple(positioned.shape)}, expected {(2, tokens, model.embed_dim)})")


def test_denoiser_building_blocks():
    from timm.layers import resample_abs_pos_embed
    from timm.models.vision_transformer import Block

    block = Block(dim=64, num_heads=1, mlp_ratio=4.0, qkv_bias=True)
    for attribute in ("norm1", "attn", "norm2", "mlp", "ls1", "ls2"):
        if not hasattr(block, attribute):
            fail(f"Block.{attribute}")
    grid = torch.randn(1, 4 * 4, 8)
    resampled = resample_abs_pos_embed(grid, new_size=[6, 5], old_size=[4, 4], num_prefix_tokens=0)
    if resampled.shape != (1, 30, 8):
        fail(f"resample_abs_pos_embed's output shape (now {tuple(resampled.shape)})")
