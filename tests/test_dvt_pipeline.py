"""fastsrt.DVT: backbone + denoiser, alone, upsampled, and per SRT view then aggregated."""
import pytest
import torch
import torch.nn.functional as F
from utils import rel_err, tiny_vit

import fastsrt
from fastsrt.dvt import Denoiser
from fastsrt.ops.warp_aggregate import warp_aggregate_reference

NAME = "vit_small_patch14_dinov2.lvd142m"


@pytest.fixture(scope="module")
def model():
    return tiny_vit(embed_dim=128)


@pytest.fixture(scope="module")
def denoiser():
    torch.manual_seed(1)
    den = Denoiser(128, grid=(4, 4), backbone=NAME).eval()
    with torch.no_grad():
        den.pos_embed.normal_()
    return den


def raw_tokens(model, images):
    """Final normed patch tokens straight from timm's forward_features, reshaped to (B, C, h, w)."""
    with torch.no_grad():
        tokens = model.forward_features(images)[:, model.num_prefix_tokens :]
    height, width = images.shape[-2] // 14, images.shape[-1] // 14
    return tokens.transpose(1, 2).reshape(images.shape[0], -1, height, width)


def test_single_forward_is_denoiser_of_raw_tokens(model, denoiser):
    images = torch.randn(2, 3, 56, 70)
    clean = fastsrt.DVT(model, denoiser)(images)
    with torch.no_grad():
        expected = denoiser(raw_tokens(model, images))
    assert clean.shape == (2, 128, 4, 5)
    assert rel_err(clean, expected) <= 1e-6


def test_pixel_output_upsamples_and_crops(model, denoiser):
    images = torch.randn(1, 3, 50, 60)
    dvt = fastsrt.DVT(model, denoiser, output="pixel", pad_to_patch=True)
    pixels = dvt(images)
    padded = F.pad(images, (0, 10, 0, 6))
    with torch.no_grad():
        tokens = denoiser(raw_tokens(model, padded))
    expected = tokens.repeat_interleave(14, -2).repeat_interleave(14, -1)[..., :50, :60]
    assert pixels.shape == (1, 128, 50, 60)
    assert rel_err(pixels, expected) <= 1e-6


def test_with_srt_denoises_each_view_then_aggregates(model, denoiser):
    images = torch.randn(2, 3, 42, 56)
    shifts = [(0, 0), (1, -2), (-3, 2)]
    dvt = fastsrt.DVT(model, denoiser, shifts=shifts, output="token", view_batch=4)
    views = []
    for dy, dx in shifts:  # view(y, x) = image(y - dy, x - dx), zero fill, written out here
        padded = F.pad(images, (3, 3, 3, 3))
        shifted = padded[..., 3 - dy : 3 - dy + 42, 3 - dx : 3 - dx + 56]
        with torch.no_grad():
            views.append(denoiser(raw_tokens(model, shifted)))
    expected, _ = warp_aggregate_reference(torch.stack(views), shifts, 14, output="token")
    assert rel_err(dvt(images), expected) <= 1e-5
    identity_twice = fastsrt.DVT(model, denoiser, shifts=[(0, 0), (0, 0)])(images)
    assert rel_err(identity_twice, fastsrt.DVT(model, denoiser)(images)) <= 1e-5


def test_with_srt_pixel_median_on_a_padded_image_equals_denoising_each_view_then_aggregating(model, denoiser):
    """Pixel output of an image padded to the patch: each view denoised, warp-aggregated with the
    median at pixel resolution, then cropped back."""
    images = torch.randn(1, 3, 40, 50)
    shifts = [(0, 0), (2, 5), (-6, -1), (4, -3)]
    dvt = fastsrt.DVT(model, denoiser, shifts=shifts, output="pixel", reduce="median", padding="replicate",
                      pad_to_patch=True, view_batch=1)
    padded = F.pad(images, (0, 6, 0, 2))  # 42 x 56
    views = []
    for dy, dx in shifts:  # replicate fill, written out: the source index clamped into the image
        rows = (torch.arange(42) - dy).clamp(0, 41)
        cols = (torch.arange(56) - dx).clamp(0, 55)
        with torch.no_grad():
            views.append(denoiser(raw_tokens(model, padded[..., rows[:, None], cols[None, :]])))
    expected, _ = warp_aggregate_reference(torch.stack(views), shifts, 14, reduce="median", output="pixel")
    got = dvt(images)
    assert got.shape == (1, 128, 40, 50)
    assert rel_err(got, expected[..., :40, :50]) <= 1e-5
    assert dvt.srt.token_transform is denoiser  # DVT is SRT with the denoiser as its hook


def test_denoiser_of_another_backbone_is_refused(model, denoiser, tmp_path):
    with pytest.raises(ValueError, match="128-channel tokens but"):
        fastsrt.DVT(tiny_vit(embed_dim=64), denoiser)
    other = Denoiser(128, grid=(4, 4), backbone="vit_base_patch16_224.augreg_in21k")
    with pytest.raises(ValueError, match="trained on vit_base_patch16_224"):
        fastsrt.DVT(model, other)
    path = other.save(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not for vit_small_patch14_dinov2"):
        fastsrt.DVT(model, path)
    with pytest.raises(ValueError, match="output"):
        fastsrt.DVT(model, denoiser, output="voxel")
