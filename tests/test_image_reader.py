"""fastsrt.io.load_image, the one image reader: real files written in tmp_path, hostile ones included
(a decompression bomb, rotated phone photos, 16-bit and float frames, alpha, truncated and non-image files)."""
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import fastsrt
from fastsrt.cli import main
from fastsrt.dvt.decomposition import DecomposeConfig
from fastsrt.dvt.runner import fit_folder
from fastsrt.extract import extract
from fastsrt.io import BACKGROUND, ImageReadError, load_image, load_tensors, to_rgb_tensor
from fastsrt.ops.grid_encoding import GridEncodingConfig
from fastsrt.options import MAX_PIXELS

FAST = ["--model", "vit_small_patch14_dinov2", "--pretrained", "no", "--shifts", "1", "--size", "28"]


def write_png(path, width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> None:
    """A PNG written chunk by chunk, so that its header can claim what Pillow would not write: a size
    the data does not have, or 16 bits per RGB channel."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def write_bomb(path) -> None:
    """A PNG whose header claims 60000 x 60000 grey pixels (3.6 GB decoded) over a few bytes of data."""
    write_png(path, 60000, 60000, 8, 0, b"\x00" * 64)


def random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def as_array(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) tensor -> (H, W, 3) array."""
    return image.permute(1, 2, 0).numpy()


def test_a_bomb_is_refused_from_its_header_naming_the_file_and_the_limit(tmp_path):
    write_bomb(tmp_path / "bomb.png")
    with pytest.raises(ImageReadError) as raised:
        load_image(tmp_path / "bomb.png")
    message = str(raised.value)
    # refused before decoding: decoding the few bytes would have failed as a truncated file instead
    assert "bomb.png" in message and "60000 x 60000" in message and f"limit of {MAX_PIXELS} pixels" in message
    assert "not decoded" in message

    Image.fromarray(random_rgb(40, 50)).save(tmp_path / "small.png")
    assert load_image(tmp_path / "small.png", max_pixels=2000).shape == (3, 40, 50)
    with pytest.raises(ImageReadError, match="small.png.*50 x 40 = 2000 pixels is over the limit of 1999"):
        load_image(tmp_path / "small.png", max_pixels=1999)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_pixels must be an int >= 1"):
            load_image(tmp_path / "small.png", max_pixels=bad)


def test_pillows_own_bomb_limit_neither_fires_first_nor_changes(tmp_path, monkeypatch):
    Image.fromarray(random_rgb(40, 50)).save(tmp_path / "small.png")  # 2000 pixels
    expected = np.asarray(Image.open(tmp_path / "small.png"), dtype=np.float32) / 255
    for pillow_limit in (1500, 500):  # Pillow would warn (over its limit), then fail (over twice its limit)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pillow_limit)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            image = load_image(tmp_path / "small.png")  # fastsrt's limit governs: the default, far above
        assert np.array_equal(as_array(image), expected)
        assert Image.MAX_IMAGE_PIXELS == pillow_limit  # restored for everyone else
        with pytest.raises(Image.DecompressionBombError) if pillow_limit == 500 else \
                pytest.warns(Image.DecompressionBombWarning):
            Image.open(tmp_path / "small.png")  # Pillow's check is on again outside load_image


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_exif_orientation_6_comes_out_upright(tmp_path, suffix):
    stored = random_rgb(20, 30)  # a phone stores a portrait photo sideways and tags it "rotate 90 clockwise"
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / f"portrait{suffix}"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    with Image.open(path) as file:
        decoded = np.asarray(file.convert("RGB"), dtype=np.float32) / 255  # as stored, before orientation
    image = load_image(path)
    assert image.shape == (3, 30, 20)
    assert np.array_equal(as_array(image), np.rot90(decoded, k=-1))  # turned clockwise by hand
    if suffix == ".png":
        assert np.array_equal(as_array(image), np.rot90(stored, k=-1) / np.float32(255))


def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path):
    values = np.linspace(0, 65535, 64 * 48).round().astype(np.uint16).reshape(48, 64)
    Image.fromarray(values).save(tmp_path / "frame.png")
    assert Image.open(tmp_path / "frame.png").mode == "I;16"
    image = load_image(tmp_path / "frame.png")
    expected = values.astype(np.float32) / 65535
    assert all(torch.equal(channel, torch.from_numpy(expected)) for channel in image)
    assert (image == 1).float().mean() < 0.01  # clipping at 255 made 99% of such a frame white


def test_16_bit_rgb_png_keeps_its_range(tmp_path):
    values = np.random.default_rng(1).integers(0, 65536, (8, 12, 3), dtype=np.uint16)
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in values)
    write_png(tmp_path / "rgb48.png", 12, 8, 16, 2, rows)
    image = load_image(tmp_path / "rgb48.png")
    assert np.abs(as_array(image) - values / 65535).max() <= 1 / 255  # Pillow keeps the top 8 bits


def test_16_bit_pgm_and_big_endian_tiff(tmp_path):
    values = np.linspace(0, 65535, 20 * 10).round().astype(np.uint16).reshape(10, 20)
    Image.fromarray(values).save(tmp_path / "frame.pgm")
    assert Image.open(tmp_path / "frame.pgm").mode == "I"  # Pillow widens a 16-bit PGM to 32-bit ints
    assert torch.equal(load_image(tmp_path / "frame.pgm")[1], torch.from_numpy(values / np.float32(65535)))
    big_endian = Image.frombytes("I;16B", (20, 10), values.astype(">u2").tobytes())
    assert torch.equal(to_rgb_tensor(big_endian)[2], torch.from_numpy(values / np.float32(65535)))


def test_32_bit_and_float_images_outside_their_range_are_refused_not_clipped(tmp_path):
    Image.fromarray(np.array([[0, 70000]], dtype=np.int32)).save(tmp_path / "counts.tif")
    with pytest.raises(ImageReadError, match=r"counts.tif.*mode I values span \[0, 70000\], outside \[0, 65535\]"):
        load_image(tmp_path / "counts.tif")
    floats = np.array([[0.0, 0.25], [0.5, 1.0]], dtype=np.float32)
    Image.fromarray(floats).save(tmp_path / "unit.tif")
    assert torch.equal(load_image(tmp_path / "unit.tif")[0], torch.from_numpy(floats))
    for name, bad in (("bright", 2.0), ("nan", np.nan)):
        Image.fromarray(floats * 0 + np.float32(bad)).save(tmp_path / f"{name}.tif")
        with pytest.raises(ImageReadError, match=f"{name}.tif.*mode F values span"):
            load_image(tmp_path / f"{name}.tif")


def test_alpha_is_composited_on_white(tmp_path):
    assert BACKGROUND == 1.0
    rgba = np.array([[[255, 0, 0, 255], [255, 0, 0, 0], [0, 0, 0, 128], [0, 64, 128, 51]]], dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    alpha = rgba[..., 3:] / np.float32(255)
    expected = rgba[..., :3] / np.float32(255) * alpha + (1 - alpha)
    assert np.allclose(as_array(load_image(tmp_path / "rgba.png")), expected, atol=1e-6)

    grey_alpha = Image.fromarray(np.array([[[10, 0], [10, 255]]], dtype=np.uint8), "LA")
    grey_alpha.save(tmp_path / "la.png")
    assert np.allclose(as_array(load_image(tmp_path / "la.png")), [[[1, 1, 1], [10 / 255] * 3]])

    palette = Image.fromarray(np.array([[0, 1, 2]], dtype=np.uint8), "P")
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 0])
    palette.save(tmp_path / "p.png", transparency=1)  # colour 1 (green) is transparent
    palette.save(tmp_path / "p.gif", transparency=1)
    for name in ("p.png", "p.gif"):
        assert np.array_equal(as_array(load_image(tmp_path / name)), [[[1, 0, 0], [1, 1, 1], [0, 0, 0]]]), name

    grey16 = np.array([[0, 1000, 65535]], dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "key16.png", transparency=1000)  # a transparent grey level
    assert np.allclose(load_image(tmp_path / "key16.png")[0].numpy(), [[0, 1, 1]])


@pytest.mark.parametrize("mode,suffix", [("P", ".png"), ("P", ".gif"), ("CMYK", ".jpg"), ("CMYK", ".tif"),
                                         ("L", ".png"), ("1", ".png"), ("1", ".bmp"), ("RGB", ".webp")])
def test_other_modes_are_converted_to_rgb(tmp_path, mode, suffix):
    path = tmp_path / f"image{suffix}"
    Image.fromarray(random_rgb(12, 16)).convert(mode).save(path, **({"lossless": True} if suffix == ".webp" else {}))
    with Image.open(path) as file:
        assert file.mode == mode
        expected = np.asarray(file.convert("RGB"), dtype=np.float32) / 255
    image = load_image(path)
    assert image.dtype == torch.float32 and image.shape == (3, 12, 16)
    assert np.array_equal(as_array(image), expected)
    assert len(np.unique(expected)) > (1 if mode == "1" else 3)  # not a blank picture


def test_truncated_and_non_image_files_are_reported_by_name(tmp_path):
    Image.fromarray(random_rgb(40, 50)).save(tmp_path / "whole.png")
    Image.fromarray(random_rgb(40, 50)).save(tmp_path / "whole.jpg")
    for suffix in (".png", ".jpg"):
        data = (tmp_path / f"whole{suffix}").read_bytes()
        (tmp_path / f"cut{suffix}").write_bytes(data[: len(data) // 2])
        with pytest.raises(ImageReadError, match=f"'.*cut{suffix}': OSError: image file is truncated"):
            load_image(tmp_path / f"cut{suffix}")
    (tmp_path / "notes.png").write_text("a text file with an image's name")
    with pytest.raises(ImageReadError, match="notes.png.*cannot identify image file"):
        load_image(tmp_path / "notes.png")
    with pytest.raises(ImageReadError, match="Is a directory"):
        load_image(tmp_path)


@pytest.fixture
def hostile_folder(tmp_path):
    """Two good images, and a bomb, a truncated PNG and a text file named .png sorted among them."""
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(random_rgb(40, 40, seed=1)).save(folder / "b_good.png")
    Image.fromarray(random_rgb(30, 60, seed=2)).save(folder / "d_good.jpg")
    write_bomb(folder / "a_bomb.png")
    data = (folder / "b_good.png").read_bytes()
    (folder / "c_truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "e_text.png").write_text("not an image at all")
    return folder


def test_extract_finishes_the_good_images_and_reports_the_bad_ones(hostile_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["extract", str(hostile_folder), "--out", str(out), *FAST]) == 1
    captured = capsys.readouterr()
    assert "2 written, 0 already done (skipped), 3 failed" in captured.out
    failed = [line for line in captured.err.splitlines() if line.startswith("  failed: ")]
    assert len(failed) == 3 and "Traceback" not in captured.out + captured.err
    assert "a_bomb.png" in failed[0] and f"over the limit of {MAX_PIXELS} pixels" in failed[0]
    assert "c_truncated.png" in failed[1] and "truncated" in failed[1]
    assert "e_text.png" in failed[2] and "cannot identify image file" in failed[2]
    assert sorted(p.name for p in out.iterdir()) == ["b_good.png", "b_good.safetensors", "d_good.png",
                                                      "d_good.safetensors"]
    with safe_open(out / "d_good.safetensors", "pt") as f:  # the images after the bomb were processed
        assert f.get_tensor("srt").shape == (384, 28, 56)

    assert main(["extract", str(hostile_folder), "--out", str(tmp_path / "small"), "--max-pixels", "1700", *FAST]) == 1
    assert "1 written" in capsys.readouterr().out  # 40 x 40 passes, 60 x 30 does not


class FailsOnBrightImages:
    """A backbone (patch 8: per patch, the mean colour) that raises, as a real model can run out of
    memory on one image, whenever an image of the batch is mostly white."""

    def __call__(self, images):
        if (images.flatten(1).mean(1) > 1.5).any():  # normalised: white is about +2
            raise RuntimeError("out of memory\nsecond line of the message")
        colours = torch.nn.functional.avg_pool2d(images, 8)
        return torch.cat([colours, colours**2], 1)


def write_images(folder, bright_stem: str) -> None:
    folder.mkdir()
    for i, stem in enumerate(("a", "b", "c")):
        pixels = random_rgb(24, 24, seed=i)
        Image.fromarray(pixels | 240 if stem == bright_stem else pixels).save(folder / f"{stem}.png")


def test_any_exception_computing_one_image_is_its_failure_in_extract(tmp_path):
    write_images(tmp_path / "images", bright_stem="b")
    srt = fastsrt.SRT(fastsrt.CallableBackbone(FailsOnBrightImages(), patch_size=8), 1)
    report = extract([tmp_path / "images"], tmp_path / "out", srt, short_side=16, progress=False)
    assert [p.name for p in report.written] == ["a.png", "c.png"]
    [(path, reason)] = report.failed
    assert path.name == "b.png"
    assert reason == f"cannot process {str(path)!r}: RuntimeError: out of memory"  # one line


TINY_FIT = DecomposeConfig(views=2, iterations=2, size=16, tokens_per_step=8,
                           encoding=GridEncodingConfig(levels=2, features=2, log2_table_size=6, base_resolution=2,
                                                       max_resolution=4))


def test_a_failing_group_is_fitted_again_one_image_at_a_time(tmp_path):
    write_images(tmp_path / "images", bright_stem="a")
    config = TINY_FIT
    backbone = fastsrt.CallableBackbone(FailsOnBrightImages(), patch_size=8)
    report = fit_folder(tmp_path / "images", tmp_path / "out", backbone, config, images_per_fit=2, progress=False)
    assert [p.name for p in report.written] == ["b.png", "c.png"]  # b was grouped with the failing a
    assert [p.name for p, _ in report.failed] == ["a.png"] and "RuntimeError: out of memory" in report.failed[0][1]
    fit_folder(tmp_path / "images" / "b.png", tmp_path / "alone", backbone, config, progress=False)
    grouped, alone = (load_tensors(tmp_path / out / "b.safetensors") for out in ("out", "alone"))
    assert grouped.keys() == alone.keys() and all(torch.equal(grouped[k], alone[k]) for k in grouped)  # image_seed


def test_an_error_that_every_image_would_meet_ends_the_run(tmp_path):
    write_images(tmp_path / "images", bright_stem="none")
    three_channels = fastsrt.CallableBackbone(lambda images: torch.nn.functional.avg_pool2d(images, 8), patch_size=8)
    with pytest.raises(ValueError, match="at least 4 channels"):  # a bad setting, not three failed images
        fit_folder(tmp_path / "images", tmp_path / "out", three_channels, TINY_FIT, progress=False)
    assert not (tmp_path / "out").exists()


def test_max_pixels_reaches_every_command(tmp_path, capsys):
    from fastsrt.cli import build_parser

    for command in (["extract", "x", "--out", "o"], ["fit", "x", "--out", "o"], ["demo"],
                    ["train-denoiser", "x", "--out", "o", "--srt-targets"]):
        assert build_parser().parse_args(command).max_pixels == MAX_PIXELS
        assert build_parser().parse_args([*command, "--max-pixels", "7"]).max_pixels == 7
    write_bomb(tmp_path / "bomb.png")
    assert main(["demo", "--image", str(tmp_path / "bomb.png"), "--out", str(tmp_path / "o"), *FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastsrt: error: cannot read image") and "bomb.png" in err and len(err.splitlines()) == 1
    assert main(["extract", str(tmp_path), "--out", str(tmp_path / "o"), "--max-pixels", "0", *FAST]) == 2
    assert capsys.readouterr().err == "fastsrt: error: max_pixels must be an int >= 1, got 0\n"


def test_srt_targets_read_with_the_reader_and_its_limit(tmp_path):
    from utils import tiny_vit

    from fastsrt.dvt import SRTTargets

    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.arange(0, 65536, 64, dtype=np.uint16).reshape(32, 32)).save(folder / "a_frame16.png")
    write_bomb(folder / "b_bomb.png")
    srt = fastsrt.SRT(tiny_vit(), shifts=1, output="token")
    with pytest.raises(ValueError, match="max_pixels must be"):
        SRTTargets(folder, srt, size=28, max_pixels=0)
    source = SRTTargets(folder, srt, size=28, max_pixels=32 * 32)
    expected = fastsrt.io.normalize(torch.nn.functional.interpolate(
        load_image(folder / "a_frame16.png")[None], size=(28, 28), mode="bicubic", antialias=True)[0].clamp(0, 1))
    assert torch.equal(source[0], expected)  # scaled 16-bit values, not a white square
    with pytest.raises(ImageReadError, match="b_bomb.png.*over the limit of 1024 pixels"):
        source[1]
