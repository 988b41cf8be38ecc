import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import fastsrt
from fastsrt.cli import main
from fastsrt.dvt import iter_pairs, load_pair
from fastsrt.dvt import runner as runner_module
from fastsrt.dvt.decomposition import DecomposeConfig
from fastsrt.dvt.runner import FORMAT, fit_folder, load_fit, shard
from fastsrt.io import normalize, save_tensors
from fastsrt.ops.grid_encoding import GridEncodingConfig

CONFIG = DecomposeConfig(views=3, iterations=4, size=32, tokens_per_step=32,
                         encoding=GridEncodingConfig(levels=3, features=2, log2_table_size=8, base_resolution=4,
                                                     max_resolution=16))
GOOD = ["a", "b", "c", "d"]
FIT = runner_module.fit_decomposition


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: see tests/test_dvt_decompose.py
    yield
    torch.set_num_threads(threads)


def features_of(images):
    """A backbone-like callable: per 8 x 8 patch, the mean colour and its square (6 channels)."""
    colours = F.avg_pool2d(images, 8)
    return torch.cat([colours, colours**2], 1)


@pytest.fixture
def backbone():
    return fastsrt.CallableBackbone(features_of, patch_size=8)


@pytest.fixture
def folder(tmp_path):
    """Four images of different sizes and a file that is not an image."""
    folder = tmp_path / "images"
    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    for i, stem in enumerate(GOOD):
        pixels = (torch.rand(20 + 4 * i, 24, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{stem}.png")
    (folder / "broken.png").write_bytes(b"not a png at all")
    return folder


class Interrupted(Exception):
    """Stands for a crash or Ctrl-C in the middle of a run."""


class CountingFit:
    """Wraps the runner's fit_decomposition: counts the images fitted, can stop after some calls."""

    def __init__(self, stop_after=None):
        self.images, self.calls, self.stop_after = 0, 0, stop_after

    def __call__(self, features, *args, **kwargs):
        if self.stop_after is not None and self.calls == self.stop_after:
            raise Interrupted
        self.calls += 1
        self.images += features.cache.shape[0]
        return FIT(features, *args, **kwargs)


def test_writes_the_stage_one_file_format(folder, tmp_path, backbone):
    out = tmp_path / "out"
    report = fit_folder(folder, out, backbone, CONFIG, progress=False)
    assert sorted(p.stem for p in report.written) == GOOD
    assert [p.name for p, _ in report.failed] == ["broken.png"] and "cannot read image" in report.failed[0][1]
    assert sorted(p.name for p in out.iterdir()) == [f"{s}.safetensors" for s in GOOD]  # no temporary files left
    tensors, metadata = load_fit(out / "c.safetensors")
    assert set(tensors) == {"raw", "clean", "artifact"}
    assert all(t.shape == (6, 4, 4) and t.dtype == torch.float32 for t in tensors.values())
    assert metadata["format"] == FORMAT and metadata["image_size"] == 32 and metadata["patch_size"] == 8
    assert metadata["iterations"] == 4 and metadata["views"] == 3 and metadata["layer"] == -1 and metadata["grid"] == 4
    assert metadata["source"] == str(folder / "c.png") and metadata["source_size"] == [28, 24]
    assert "model" not in metadata and metadata["encoding"] in ("extension", "reference")  # a callable has no name
    # "raw" is the backbone's output on the full image, resized to size x size
    image = fastsrt.io.load_image(folder / "c.png")
    square = F.interpolate(image[None], size=(32, 32), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    assert torch.allclose(tensors["raw"], features_of(normalize(square[0])[None])[0], atol=1e-6)
    raw, clean = load_pair(out / "c.safetensors")
    assert torch.equal(raw, tensors["raw"]) and torch.equal(clean, tensors["clean"])
    assert len(list(iter_pairs(out))) == 4


def test_resume_after_an_interruption_loses_and_redoes_nothing(folder, tmp_path, backbone, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(runner_module, "fit_decomposition", CountingFit(stop_after=2))
    with pytest.raises(Interrupted):
        fit_folder(folder, out, backbone, CONFIG, progress=False)
    finished = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    assert sorted(finished) == ["a.safetensors", "b.safetensors"]

    counter = CountingFit()
    monkeypatch.setattr(runner_module, "fit_decomposition", counter)
    report = fit_folder(folder, out, backbone, CONFIG, progress=False)
    assert counter.images == 2 and sorted(p.stem for p in report.written) == ["c", "d"]
    assert sorted(p.stem for p in report.skipped) == ["a", "b"] and len(report.failed) == 1
    for name, (mtime, data) in finished.items():
        assert (out / name).stat().st_mtime_ns == mtime and (out / name).read_bytes() == data
    assert sorted(p.name for p in out.iterdir()) == [f"{s}.safetensors" for s in GOOD]


def test_two_shards_cover_every_image_exactly_once(folder, tmp_path, backbone, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    second = fit_folder(folder, out, backbone, CONFIG, progress=False)  # rank and world size from the environment
    first = fit_folder(folder, out, backbone, CONFIG, rank=0, world_size=2, progress=False)
    done = [p.stem for p in first.written + second.written] + [p.stem for p, _ in first.failed + second.failed]
    assert sorted(done) == sorted(GOOD + ["broken"])  # each image once, in one shard
    assert not first.skipped and not second.skipped and first.written and second.written


def test_images_fitted_in_groups_give_the_files_of_one_at_a_time(folder, tmp_path, backbone, monkeypatch):
    counter = CountingFit()
    monkeypatch.setattr(runner_module, "fit_decomposition", counter)
    report = fit_folder(folder, tmp_path / "groups", backbone, CONFIG, images_per_fit=3, progress=False)
    assert len(report.written) == 4 and counter.calls == 2 and counter.images == 4
    fit_folder(folder, tmp_path / "single", backbone, CONFIG, progress=False)  # other groups and positions
    seeds = set()
    for stem in GOOD:
        (grouped, meta), (single, _) = (load_fit(tmp_path / out / f"{stem}.safetensors")
                                        for out in ("groups", "single"))
        assert all(torch.allclose(grouped[key], single[key], rtol=1e-6, atol=1e-7) for key in grouped), stem
        assert meta["image_seed"] == runner_module.image_seed(0, stem)
        seeds.add(meta["image_seed"])
    assert len(seeds) == len(GOOD)  # each image draws its own crops and samples


def test_shard_and_runner_reject_bad_values(folder, tmp_path, backbone):
    assert shard(list(range(7)), 2, 3) == [2, 5]
    with pytest.raises(ValueError, match="rank"):
        shard([1, 2], 2, 2)
    with pytest.raises(ValueError, match="images_per_fit"):
        fit_folder(folder, tmp_path, backbone, CONFIG, images_per_fit=0)
    Image.new("RGB", (16, 16)).save(folder / "a.jpg")
    with pytest.raises(ValueError, match="share the name 'a'"):
        fit_folder(folder, tmp_path, backbone, CONFIG)


def test_load_pair_reports_bad_files(tmp_path):
    save_tensors(tmp_path / "partial.safetensors", {"raw": torch.zeros(2, 3, 3)})
    with pytest.raises(ValueError, match="no tensor 'clean'"):
        load_pair(tmp_path / "partial.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="cannot read"):
        load_pair(tmp_path / "garbage.safetensors")


def test_cli_fit_resumes_and_reports(folder, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["fit", str(folder), "--out", str(out), "--model", "vit_small_patch14_dinov2", "--pretrained", "no",
            "--size", "28", "--views", "2", "--iterations", "2", "--tokens-per-step", "8", "--levels", "2",
            "--features", "2", "--log2-table-size", "6", "--base-resolution", "2", "--max-resolution", "4",
            "--device", "cpu", "--batch", "2"]
    assert main(args) == 1  # the broken image
    captured = capsys.readouterr()
    assert "4 written, 0 already done (skipped), 1 failed" in captured.out and "broken.png" in captured.err
    raw, clean = load_pair(out / "a.safetensors")
    assert raw.shape == clean.shape == (384, 2, 2)
    assert main(args) == 1
    assert "0 written, 4 already done (skipped), 1 failed" in capsys.readouterr().out
    assert main(args[:-2] + ["--iterations", "1"]) == 2  # a bad setting: a clear error, no traceback
    assert "iterations must be" in capsys.readouterr().err


def test_cli_fit_with_an_unavailable_extension_is_one_line(folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FASTSRT_NO_EXTENSION", "1")  # the extension cannot run, as without a compiler
    args = ["fit", str(folder), "--out", str(tmp_path / "out"), "--model", "vit_small_patch14_dinov2",
            "--pretrained", "no", "--size", "28", "--views", "2", "--iterations", "2", "--device", "cpu",
            "--impl", "extension"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "fastsrt: error: grid encoding: impl='extension' cannot run here" in err and "Traceback" not in err


def test_pairs_of_a_timm_module_train_a_denoiser_that_module_accepts(folder, tmp_path):
    from utils import tiny_vit

    from fastsrt.dvt import PairFolder, TrainConfig, train_denoiser

    vit = tiny_vit(embed_dim=64)
    config = DecomposeConfig(views=2, iterations=2, size=28, tokens_per_step=8, encoding=CONFIG.encoding)
    fit_folder(folder, tmp_path / "fits", vit, config, progress=False)
    assert load_fit(tmp_path / "fits" / "a.safetensors")[1]["model"] == "vit_small_patch14_dinov2.lvd142m"
    pairs = PairFolder(tmp_path / "fits")
    assert pairs.backbone == "vit_small_patch14_dinov2.lvd142m"
    config = TrainConfig(epochs=1, batch_size=2)
    denoiser = train_denoiser(pairs, tmp_path / "den.safetensors", config, progress=False).denoiser
    assert denoiser.backbone == "vit_small_patch14_dinov2.lvd142m"
    images = torch.randn(1, 3, 28, 28)
    assert fastsrt.DVT(vit, denoiser)(images).shape == (1, 64, 2, 2)
    assert fastsrt.DVT(vit, tmp_path / "den.safetensors")(images).shape == (1, 64, 2, 2)


def test_pairs_without_a_timm_name_train_a_denoiser_for_any_backbone(folder, tmp_path, backbone):
    from fastsrt.dvt import PairFolder

    fit_folder(folder, tmp_path / "fits", backbone, CONFIG, progress=False)
    assert PairFolder(tmp_path / "fits").backbone is None
    tensors, metadata = load_fit(tmp_path / "fits" / "a.safetensors")
    # older files held the model's class name
    save_tensors(tmp_path / "fits" / "a.safetensors", tensors, {**metadata, "model": "VisionTransformer"})
    assert PairFolder(tmp_path / "fits").backbone is None
