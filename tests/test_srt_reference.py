"""The SRT reference path against independent computations of the authors' algorithm."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from utils import rel_err, shifted_by_padding, tiny_vit

import fastsrt
from fastsrt import SRT

SHIFTS = [(0, 0), (0, 0), (2, -3), (-5, 1), (1, 1), (-3, -4), (4, 6), (0, 0)]  # identity 3 times


def authors_views(model, images, shifts, patch, padding="zeros", upsample="nearest"):
    """Per view, one at a time: shift the image, forward, upsample, shift back (zero fill).
    Returns the warped views (K, B, C, H, W) and where each is inside the frame (K, 1, 1, H, W)."""
    warped, inside = [], []
    for dy, dx in shifts:
        view = shifted_by_padding(images, dy, dx, padding)
        with torch.no_grad():
            tokens = model.forward_features(view)[:, model.num_prefix_tokens :]
        grid = tokens.reshape(images.shape[0], images.shape[2] // patch, images.shape[3] // patch, -1)
        grid = grid.permute(0, 3, 1, 2)
        if upsample == "nearest":
            pixels = F.interpolate(grid, scale_factor=patch, mode="nearest")
        else:
            pixels = F.interpolate(grid, scale_factor=patch, mode="bilinear", align_corners=False)
        warped.append(shifted_by_padding(pixels, -dy, -dx, "zeros"))
        inside.append(shifted_by_padding(torch.ones_like(pixels[:1, :1]), -dy, -dx, "zeros"))
    return torch.stack(warped), torch.stack(inside)


def authors_mean(model, images, shifts, patch, **kwargs):
    warped, _ = authors_views(model, images, shifts, patch, **kwargs)
    return warped.sum(0) / len(shifts)


@pytest.mark.parametrize(
    "name,patch",
    [("vit_small_patch14_dinov2", 14), ("vit_small_patch14_reg4_dinov2", 14), ("vit_base_patch16_224", 16)],
)
def test_matches_authors_algorithm_pixel_and_token(name, patch):
    model = tiny_vit(name)
    images = torch.randn(2, 3, 3 * patch, 4 * patch)
    expected = authors_mean(model, images, SHIFTS, patch)
    pixel = SRT(model, SHIFTS, impl="reference", view_batch=5)(images)
    token = SRT(model, SHIFTS, output="token", impl="reference")(images)
    assert pixel.shape == (2, 48, 3 * patch, 4 * patch) and token.shape == (2, 48, 3, 4)
    assert rel_err(pixel, expected) <= 1e-5
    assert rel_err(token, F.avg_pool2d(expected, patch)) <= 1e-5
    # borders shrink toward 0 (unmasked mean): the top row sees only views with dy <= 0
    assert not torch.allclose(pixel, SRT(model, SHIFTS, ignore_padding=True)(images))


def test_int_shifts_are_the_paper_grid():
    model = tiny_vit()
    images = torch.randn(1, 3, 28, 28)
    torch.testing.assert_close(SRT(model, 1)(images), SRT(model, fastsrt.paper_grid(1))(images), rtol=0, atol=0)
    assert len(SRT(model, 3).shifts) == 50


def test_ignore_padding_averages_covering_views_only():
    model = tiny_vit()
    images = torch.randn(1, 3, 28, 42)
    warped, inside = authors_views(model, images, SHIFTS, 14)
    expected = warped.sum(0) / inside.sum(0)
    got = SRT(model, SHIFTS, ignore_padding=True)(images)
    assert rel_err(got, expected) <= 1e-5


def test_uncovered_pixels_are_zero_with_ignore_padding():
    model = tiny_vit()
    images = torch.randn(1, 3, 28, 28)
    got = SRT(model, [(2, 0), (3, 1)], ignore_padding=True)(images)  # no view covers the last 2 rows
    assert got[..., -2:, :].abs().max() == 0 and got[..., :-2, :].abs().min() > 0


@pytest.mark.parametrize("padding", ["replicate", "reflect"])
def test_padding_modes_match_authors_algorithm_with_that_fill(padding):
    model = tiny_vit()
    images = torch.randn(1, 3, 28, 42)
    expected = authors_mean(model, images, SHIFTS, 14, padding=padding)
    got = SRT(model, SHIFTS, padding=padding)(images)
    assert rel_err(got, expected) <= 1e-5
    assert rel_err(got, SRT(model, SHIFTS)(images)) > 1e-3  # the fill matters


def test_bilinear_matches_interpolate_per_view():
    model = tiny_vit()
    images = torch.randn(2, 3, 42, 28)
    expected = authors_mean(model, images, SHIFTS, 14, upsample="bilinear")
    got = SRT(model, SHIFTS, upsample="bilinear")(images)
    assert rel_err(got, expected) <= 1e-5


def lower_middle(values: np.ndarray) -> float:
    ordered = np.sort(values)
    return ordered[(len(ordered) - 1) // 2] if len(ordered) else 0.0


@pytest.mark.parametrize("ignore_padding", [False, True])
def test_median_is_the_lower_middle_per_pixel(ignore_padding):
    model = tiny_vit(depth=1)
    images = torch.randn(1, 3, 28, 28)
    shifts = SHIFTS[:6]  # an even count: the lower of the two middle values
    warped, inside = authors_views(model, images, shifts, 14)
    warped, inside = warped.numpy(), inside.expand(warped.shape).numpy() > 0
    if not ignore_padding:
        inside[:] = True
    got = SRT(model, shifts, reduce="median", ignore_padding=ignore_padding)(images).numpy()
    for c in range(0, 48, 7):
        for y in range(28):
            for x in range(28):
                values = warped[:, 0, c, y, x][inside[:, 0, c, y, x]]
                assert got[0, c, y, x] == lower_middle(values)


def test_std_across_views_and_cls_mean():
    model = tiny_vit()
    images = torch.randn(2, 3, 28, 28)
    warped, _ = authors_views(model, images, SHIFTS, 14)
    out = SRT(model, SHIFTS).run(images, std=True, prefix=True)
    assert rel_err(out.std, warped.std(0, unbiased=False)) <= 1e-5
    with torch.no_grad():
        cls = torch.stack([model.forward_features(shifted_by_padding(images, dy, dx, "zeros"))[:, :1]
                           for dy, dx in SHIFTS])
    assert out.prefix.shape == (2, 1, 48)
    assert rel_err(out.prefix, cls.mean(0)) <= 1e-5


def test_several_layers_equal_single_layer_runs():
    model = tiny_vit(depth=3)
    images = torch.randn(1, 3, 28, 28)
    both = SRT(model, SHIFTS, layer=[-1, 0]).run(images, std=True)
    for i, layer in enumerate((-1, 0)):
        single = SRT(model, SHIFTS, layer=layer).run(images, std=True)
        torch.testing.assert_close(both.features[i], single.features, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(both.std[i], single.std, rtol=1e-5, atol=1e-6)


def test_pad_to_patch_crops_back():
    model = tiny_vit()
    images = torch.randn(1, 3, 25, 30)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        SRT(model, SHIFTS)(images)
    got = SRT(model, SHIFTS, pad_to_patch=True)(images)
    expected = SRT(model, SHIFTS)(F.pad(images, (0, 12, 0, 3)))[..., :25, :30]
    assert got.shape == (1, 48, 25, 30)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_view_batch_does_not_change_the_result():
    model = tiny_vit()
    images = torch.randn(3, 3, 28, 28)
    a = SRT(model, SHIFTS, view_batch=1)(images)
    b = SRT(model, SHIFTS, view_batch=100)(images)
    assert rel_err(a, b) <= 1e-6


def patch_mean_backbone(patch):
    return fastsrt.CallableBackbone(lambda x: F.avg_pool2d(x, patch), patch_size=patch)


def test_closed_form_for_patch_average_tokens():
    """Tokens = mean colour of each patch. Then SRT's mean at pixel (y, x) is, by hand,
    1/K sum_k [y+dy, x+dx inside] * mean over the patch holding (y+dy, x+dx) of image(u-dy, v-dx)."""
    patch, shifts = 4, [(0, 0), (1, 2), (-3, 1), (0, 0), (2, -2)]
    image = torch.rand(1, 3, 8, 12, dtype=torch.float64)
    got = SRT(patch_mean_backbone(patch), shifts)(image)[0].numpy()
    source = image[0].numpy()
    height, width = 8, 12
    expected = np.zeros_like(source)
    for y in range(height):
        for x in range(width):
            for dy, dx in shifts:
                vy, vx = y + dy, x + dx
                if not (0 <= vy < height and 0 <= vx < width):
                    continue
                top, left = vy // patch * patch, vx // patch * patch
                total = np.zeros(3)
                for u in range(top, top + patch):
                    for v in range(left, left + patch):
                        if 0 <= u - dy < height and 0 <= v - dx < width:
                            total += source[:, u - dy, v - dx]
                expected[:, y, x] += total / patch**2 / len(shifts)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_constant_image_gives_constant_interior():
    """A constant image with patch-average tokens: every covered view sees the same colour, so
    with ignore_padding the field is exactly that colour everywhere."""
    image = torch.full((1, 3, 12, 16), 0.25, dtype=torch.float64)
    shifts = [(0, 0), (1, 3), (-2, -1)]
    got = SRT(patch_mean_backbone(4), shifts, padding="replicate", ignore_padding=True)(image)
    torch.testing.assert_close(got, image, rtol=0, atol=1e-15)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(upsample="cubic"), "upsample='cubic'"),
        (dict(padding="circular"), "padding='circular'"),
        (dict(reduce="max"), "reduce='max'"),
        (dict(output="patch"), "output='patch'"),
        (dict(impl="cuda"), "impl='cuda'"),
        (dict(layer=5), "not a block index"),
        (dict(view_batch=0), "view_batch"),
        (dict(shifts=[(1, 2, 3)]), "pair of ints"),
    ],
)
def test_bad_options(kwargs, match):
    kwargs = {"shifts": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        SRT(tiny_vit(), **kwargs)


@pytest.mark.parametrize(
    "images,error,match",
    [
        (torch.randn(1, 3, 28), ValueError, "shape"),
        (torch.randn(1, 4, 28, 28), ValueError, "3 channels"),
        (torch.ones(1, 3, 28, 28, dtype=torch.int64), TypeError, "dtype torch.int64"),
        (torch.tensor(float("inf")).expand(1, 3, 28, 28), ValueError, "NaN or infinite"),
        (torch.randn(1, 3, 7, 28), ValueError, "smaller than one patch"),
    ],
)
def test_bad_images(images, error, match):
    with pytest.raises(error, match=match):
        SRT(tiny_vit(), 1)(images)


def test_shift_as_large_as_the_image():
    with pytest.raises(ValueError, match=r"shift \(-28, 5\) is as large as the 28x42 image"):
        SRT(tiny_vit(), [(0, 0), (-28, 5)])(torch.randn(1, 3, 28, 42))


def channel_map(channels: int, seed: int = 0) -> nn.Conv2d:
    """A random linear map of the channels, the same at every token: (N, C, h, w) -> (N, C, h, w)."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(channels, channels, 1, bias=False)
    nn.init.normal_(conv.weight)
    return conv


@pytest.mark.parametrize("upsample,ignore_padding", [("nearest", False), ("bilinear", True)])
def test_linear_token_transform_commutes_with_the_mean(upsample, ignore_padding):
    """The mean over views (and the upsampling) is linear: transforming each view's tokens by a linear
    channel map M before aggregating equals M applied to SRT's features per pixel."""
    model, transform = tiny_vit(), channel_map(48)
    images = torch.randn(2, 3, 28, 42)
    common = dict(shifts=SHIFTS, upsample=upsample, ignore_padding=ignore_padding, view_batch=6)
    got = SRT(model, token_transform=transform, **common)(images)
    with torch.no_grad():
        expected = transform(SRT(model, **common)(images))
    assert got.shape == (2, 48, 28, 42)
    assert rel_err(got, expected) <= 1e-5
    assert rel_err(got, SRT(model, **common)(images)) > 0.1  # the transform matters


def test_token_transform_is_applied_per_view_before_the_median():
    """SRT with a transform equals SRT of the backbone composed with the transform, for the median as
    well; there it is not the transform of SRT's median."""
    model, transform = tiny_vit(), channel_map(48, seed=1)
    images = torch.randn(1, 3, 28, 28)

    def transformed_tokens(views):
        with torch.no_grad():
            tokens = model.forward_features(views)[:, model.num_prefix_tokens :]
        return transform(tokens.transpose(1, 2).unflatten(2, (views.shape[-2] // 14, views.shape[-1] // 14)))

    got = SRT(model, SHIFTS, reduce="median", token_transform=transform).run(images, std=True)
    expected = SRT(transformed_tokens, SHIFTS, patch_size=14, reduce="median").run(images, std=True)
    torch.testing.assert_close(got.features, expected.features, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.std, expected.std, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        after = transform(SRT(model, SHIFTS, reduce="median")(images))
    assert rel_err(got.features, after) > 1e-2


def test_token_transform_sees_each_backbone_call_and_every_layer_but_not_the_prefix():
    model = tiny_vit(depth=3)
    seen = []

    def double(grids):
        seen.append(tuple(grids.shape))
        return 2 * grids

    images = torch.randn(2, 3, 28, 42)
    shifts = SHIFTS[:5]
    got = SRT(model, shifts, layer=[0, -1], view_batch=4, token_transform=double).run(images, prefix=True)
    plain = SRT(model, shifts, layer=[0, -1], view_batch=4).run(images, prefix=True)
    # 2 views x 2 images per call: calls of 2, 2 and 1 views, each transformed for both layers
    assert seen == [(4, 48, 2, 3)] * 4 + [(2, 48, 2, 3)] * 2
    for transformed, features in zip(got.features, plain.features):
        torch.testing.assert_close(transformed, 2 * features, rtol=1e-6, atol=1e-6)
    for a, b in zip(got.prefix, plain.prefix):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_token_transform_module_is_a_submodule_and_bad_transforms_are_refused():
    transform = channel_map(48)
    srt = SRT(tiny_vit(), 1, token_transform=transform)
    assert dict(srt.named_modules())["token_transform"] is transform
    with pytest.raises(TypeError, match="token_transform must be callable"):
        SRT(tiny_vit(), 1, token_transform="denoise")
    with pytest.raises(ValueError, match=r"token_transform must map token grids \(10, 48, 2, 2\)"):
        SRT(tiny_vit(), 1, token_transform=lambda grids: grids[:, :, :1])(torch.randn(1, 3, 28, 28))
