import pytest
import torch
from utils import shifted_by_padding

from fastsrt.ops.shift import shift_images


@pytest.mark.parametrize("padding", ["zeros", "replicate", "reflect"])
def test_views_match_padding_and_crop(padding):
    images = torch.randn(2, 3, 9, 13)
    shifts = [(0, 0), (3, -2), (-8, 12), (0, 0), (5, 5), (-1, -12)]
    views = shift_images(images, shifts, padding)
    assert views.shape == (12, 3, 9, 13)
    for k, (dy, dx) in enumerate(shifts):
        expected = shifted_by_padding(images, dy, dx, padding)
        torch.testing.assert_close(views[2 * k : 2 * k + 2], expected, rtol=0, atol=0)


def test_view_convention():
    image = torch.arange(20.0).reshape(1, 1, 4, 5)
    view = shift_images(image, [(1, 2)])
    assert view[0, 0, 1, 2] == image[0, 0, 0, 0]  # view(y, x) = image(y - dy, x - dx)
    assert view[0, 0, 0].abs().sum() == 0 and view[0, 0, :, :2].abs().sum() == 0


@pytest.mark.parametrize("shift", [(9, 0), (0, -13), (20, 20)])
def test_shift_as_large_as_the_image_raises(shift):
    with pytest.raises(ValueError, match=r"as large as the 9x13 image"):
        shift_images(torch.randn(1, 3, 9, 13), [shift])


def test_unknown_padding():
    with pytest.raises(ValueError, match="padding='circular' is not one of 'zeros', 'replicate', 'reflect'"):
        shift_images(torch.randn(1, 3, 9, 13), [(1, 1)], "circular")
