import pytest
import torch
import torch.nn.functional as F
from utils import tiny_vit

from fastsrt.backbone import Backbone, CallableBackbone, as_backbone, load_timm_model

FAMILIES = [
    ("vit_small_patch14_dinov2", 14, 1),  # patch 14, CLS
    ("vit_small_patch14_reg4_dinov2", 14, 5),  # CLS + 4 registers
    ("vit_base_patch16_224", 16, 1),  # patch 16
    ("eva02_tiny_patch14_224", 14, 1),  # EVA (rotary position embedding)
]


@pytest.mark.parametrize("name,patch,prefix", FAMILIES)
def test_last_layer_is_forward_features_without_prefix(name, patch, prefix):
    model = tiny_vit(name)
    backbone = Backbone(model)
    assert (backbone.patch_size, backbone.num_prefix_tokens) == (patch, prefix)
    images = torch.randn(2, 3, 3 * patch, 5 * patch)
    out = backbone(images, layers=-1, return_prefix=True)
    with torch.no_grad():
        expected = model.forward_features(images)
    grid = expected[:, prefix:].reshape(2, 3, 5, -1).permute(0, 3, 1, 2)
    torch.testing.assert_close(out.tokens[0], grid, rtol=0, atol=0)
    torch.testing.assert_close(out.prefix[0], expected[:, :prefix], rtol=0, atol=0)


def test_several_layers_in_the_order_asked():
    model = tiny_vit(depth=3)
    backbone = Backbone(model)
    images = torch.randn(1, 3, 28, 42)
    out = backbone(images, layers=[-1, 0, 1])
    singles = [backbone(images, layers=layer).tokens[0] for layer in (2, 0, 1)]
    for got, expected in zip(out.tokens, singles):
        torch.testing.assert_close(got, expected)
    assert not torch.equal(out.tokens[0], out.tokens[1])
    # an intermediate layer goes through the final norm too, as forward_intermediates(norm=True)
    hidden = model.blocks[0](model.norm_pre(model._pos_embed(model.patch_embed(images))))
    expected = model.norm(hidden)[:, 1:].reshape(1, 2, 3, -1).permute(0, 3, 1, 2)
    torch.testing.assert_close(out.tokens[1], expected, rtol=1e-5, atol=1e-5)


def test_size_not_a_multiple_of_the_patch_raises_or_pads():
    model = tiny_vit()
    images = torch.randn(1, 3, 30, 40)
    with pytest.raises(ValueError, match="not a multiple of the patch size 14"):
        Backbone(model)(images)
    padded = Backbone(model, pad_to_patch=True)(images).tokens[0]
    expected = Backbone(model)(F.pad(images, (0, 2, 0, 12))).tokens[0]
    assert padded.shape == (1, 48, 3, 3)
    torch.testing.assert_close(padded, expected, rtol=0, atol=0)


def test_crop_undoes_the_padding_of_prepare():
    backbone = Backbone(tiny_vit(), pad_to_patch=True)
    images = torch.randn(2, 3, 30, 40)
    padded = backbone.prepare(images)
    assert padded.shape == (2, 3, 42, 42) and padded[..., 30:, :].abs().max() == 0 and padded[..., 40:].abs().max() == 0
    torch.testing.assert_close(backbone.crop(padded, images.shape[-2:]), images, rtol=0, atol=0)
    pixels = torch.randn(2, 5, 42, 42)  # any channel count: features, std maps
    assert torch.equal(backbone.crop(pixels, (30, 40)), pixels[:, :, :30, :40])


def test_fixed_size_model_names_its_size():
    model = tiny_vit(dynamic_img_size=False, img_size=56)
    backbone = Backbone(model)
    assert backbone(torch.randn(1, 3, 56, 56)).tokens[0].shape == (1, 48, 4, 4)
    with pytest.raises(ValueError, match="only 56x56"):
        backbone(torch.randn(1, 3, 28, 56))


def test_layer_out_of_range():
    backbone = Backbone(tiny_vit(depth=2))
    for layer in (2, -3, 1.0, True):
        with pytest.raises(ValueError, match="not a block index"):
            backbone.layer_indices(layer)


def test_name_with_random_weights_and_unknown_name():
    backbone = Backbone("vit_small_patch14_dinov2", pretrained=False, depth=1, embed_dim=32, num_heads=2)
    assert backbone(torch.randn(1, 3, 28, 28)).tokens[0].shape == (1, 32, 2, 2)  # any size: dynamic_img_size
    with pytest.raises(ValueError, match="unknown timm model"):
        load_timm_model("no_such_vit", pretrained=False)
    with pytest.raises(ValueError, match="pretrained="):
        load_timm_model("vit_small_patch14_dinov2", pretrained="maybe")


def test_callable_backbone_checks_its_output():
    backbone = CallableBackbone(lambda x: F.avg_pool2d(x, 4), patch_size=4)
    out = backbone(torch.randn(2, 3, 8, 12), return_prefix=True)
    assert out.tokens[0].shape == (2, 3, 2, 3) and out.prefix[0].shape == (2, 0, 3)
    wrong = CallableBackbone(lambda x: F.avg_pool2d(x, 2), patch_size=4)
    with pytest.raises(ValueError, match=r"must return \(N, C, 2, 3\)"):
        wrong(torch.randn(1, 3, 8, 12))
    with pytest.raises(ValueError, match="needs patch_size"):
        as_backbone(lambda x: x)
    with pytest.raises(TypeError, match="not a timm ViT|must be a timm ViT"):
        as_backbone(42)


@pytest.mark.parametrize(
    "images,error,match",
    [
        (torch.randn(3, 28, 28), ValueError, r"shape \(B, C, H, W\)"),
        (torch.randn(1, 1, 28, 28), ValueError, "3 channels"),
        (torch.zeros(1, 3, 28, 28, dtype=torch.uint8), TypeError, "floating-point"),
        (torch.full((1, 3, 28, 28), float("nan")), ValueError, "NaN"),
        (torch.randn(1, 3, 10, 28), ValueError, "smaller than one patch"),
        ([[1.0]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_images(images, error, match):
    with pytest.raises(error, match=match):
        Backbone(tiny_vit())(images)


def test_module_in_training_mode_warns():
    model = tiny_vit().train()
    with pytest.warns(UserWarning, match="training mode"):
        Backbone(model)
    assert not Backbone("vit_small_patch14_dinov2", pretrained=False, depth=1, embed_dim=32, num_heads=2).model.training
