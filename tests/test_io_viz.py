import pytest
import torch
from PIL import Image

import fastsrt.io as fio
from fastsrt.viz import heat_colors, pca_colors, side_by_side


def test_load_image_and_errors(tmp_path):
    Image.new("RGB", (5, 4), (255, 0, 0)).save(tmp_path / "red.png")
    image = fio.load_image(tmp_path / "red.png")
    assert image.shape == (3, 4, 5) and image.dtype == torch.float32
    assert image[0].min() == 1 and image[1:].max() == 0
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(fio.ImageReadError, match="bad.jpg"):
        fio.load_image(tmp_path / "bad.jpg")
    with pytest.raises(fio.ImageReadError, match="missing.png"):
        fio.load_image(tmp_path / "missing.png")


def test_list_images_sorted_and_filtered(tmp_path):
    for name in ("b.png", "a.JPG", "c.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in fio.list_images([tmp_path])] == ["a.JPG", "b.png"]
    with pytest.raises(FileNotFoundError, match="nope"):
        fio.list_images([tmp_path / "nope"])


def test_save_tensors_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "x.safetensors"
    fio.save_tensors(target, {"a": torch.arange(3.0)}, {"shifts": [(0, 1)], "name": "n"})
    assert torch.equal(fio.load_tensors(target)["a"], torch.arange(3.0))

    def failing_save(tensors, path, metadata):
        open(path, "wb").write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(fio, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        fio.save_tensors(tmp_path / "y.safetensors", {"a": torch.ones(1)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]  # no partial file left
    assert torch.equal(fio.load_tensors(target)["a"], torch.arange(3.0))


def test_resize_to_patch_multiple():
    image = torch.rand(3, 30, 61)
    assert fio.resize_to_patch_multiple(image, 28, 14).shape == (3, 28, 56)
    assert fio.resize_to_patch_multiple(image, 5, 14).shape == (3, 14, 14)  # never below one patch


def test_pca_colors_shared_scale():
    torch.manual_seed(0)
    coarse = torch.randn(16, 2, 3)
    fine = coarse.repeat_interleave(4, 1).repeat_interleave(4, 2)
    a, b = pca_colors([coarse, fine])
    assert a.shape == b.shape == (8, 12, 3) and a.dtype.name == "uint8"
    assert (a == b).all()  # same features, same colours: one PCA and one scale for all panels
    assert len({tuple(c) for c in a.reshape(-1, 3)}) == 6
    picture = side_by_side([a, b], ["one", "two"], height=40)
    assert picture.height > 40 and picture.width > 2 * 60


def test_heat_colors_dark_to_bright():
    values = torch.linspace(0, 1, 101).reshape(1, 101).expand(3, -1)
    rgb = heat_colors(values).astype(int)
    assert rgb.shape == (3, 101, 3)
    brightness = rgb.sum(-1)[0]
    assert brightness[0] < 10 and brightness[-1] > 600 and (brightness[1:] >= brightness[:-1]).all()
