import argparse
import inspect
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

import fastsrt
import fastsrt.extract
from fastsrt import options
from fastsrt.cli import build_parser, defaults, main
from fastsrt.errors import Unavailable

FAST = ["--model", "vit_small_patch14_dinov2", "--pretrained", "no", "--shifts", "1", "--size", "28"]


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / "square.png")
    Image.fromarray(rng.integers(0, 255, (30, 60, 3), dtype=np.uint8)).save(folder / "wide.jpg")
    (folder / "broken.png").write_bytes(b"not an image at all")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    return folder


def test_extract_folder_writes_good_reports_bad_and_resumes(image_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["extract", str(image_folder), "--out", str(out), *FAST]) == 1  # one image failed
    captured = capsys.readouterr()
    assert "broken.png" in captured.err and "2 written" in captured.out and "1 failed" in captured.out
    with safe_open(out / "square.safetensors", "pt") as f:
        assert f.get_tensor("raw").shape == (384, 2, 2) and f.get_tensor("srt").shape == (384, 28, 28)
        assert f.get_tensor("noise").shape == (28, 28) and f.get_tensor("noise").min() >= 0
        assert f.metadata()["source"].endswith("square.png")
    with safe_open(out / "wide.safetensors", "pt") as f:
        assert f.get_tensor("srt").shape == (384, 28, 56)  # aspect kept, sides rounded to the patch
    assert Image.open(out / "square.png").size[0] > 4 * 28  # image | raw | SRT | noise panels
    assert sorted(p.name for p in out.iterdir()) == ["square.png", "square.safetensors", "wide.png", "wide.safetensors"]

    written = (out / "square.safetensors").stat().st_mtime_ns
    assert main(["extract", str(image_folder), "--out", str(out), *FAST]) == 1
    assert "0 written, 2 already done" in capsys.readouterr().out
    assert (out / "square.safetensors").stat().st_mtime_ns == written  # nothing redone


def test_extract_token_output_and_single_file(image_folder, tmp_path):
    out = tmp_path / "out"
    arguments = ["extract", str(image_folder / "square.png"), "--out", str(out), "--output", "token", "--no-png"]
    assert main([*arguments, *FAST]) == 0
    with safe_open(out / "square.safetensors", "pt") as f:
        assert f.get_tensor("srt").shape == (384, 2, 2)
    assert not (out / "square.png").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["extract", "missing_folder", "--out", "o"], "no such file or folder: 'missing_folder'"),
        (["extract", ".", "--out", "o", "--model", "no_such_vit"], "unknown timm model 'no_such_vit'"),
    ],
)
def test_errors_are_one_line_and_exit_2(args, message, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert main(args + ["--pretrained", "no"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"fastsrt: error: {message}"


def test_demo_command_end_to_end(tmp_path):
    command = Path(sys.executable).with_name("fastsrt")
    result = subprocess.run([str(command), "demo", "--out", str(tmp_path), *FAST], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "SRT (10 views" in result.stdout and str(tmp_path / "demo.png") in result.stdout
    assert Image.open(tmp_path / "demo.png").size[1] > 28
    with safe_open(tmp_path / "demo.safetensors", "pt") as f:
        assert f.get_tensor("srt").shape == (384, 28, 28)


def test_a_missing_optional_package_is_one_line_but_a_broken_fastsrt_import_is_a_bug(monkeypatch, tmp_path, capsys):
    def missing_package(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")

    monkeypatch.setattr(fastsrt.extract, "list_images", missing_package)
    assert main(["extract", str(tmp_path), "--out", str(tmp_path / "o"), *FAST]) == 2
    assert capsys.readouterr().err.strip() == "fastsrt: error: No module named 'matplotlib'"

    def broken_import(*args, **kwargs):
        raise ImportError("cannot import name 'kernels' from 'fastsrt.ops'", name="fastsrt.ops")

    monkeypatch.setattr(fastsrt.extract, "list_images", broken_import)
    with pytest.raises(ImportError, match="cannot import name 'kernels'"):
        main(["extract", str(tmp_path), "--out", str(tmp_path / "o"), *FAST])


def test_a_type_error_inside_fastsrt_shows_its_traceback(monkeypatch, tmp_path):
    def bug(paths):
        return len(paths) + "1"  # a real TypeError, raised inside fastsrt.extract.extract's call

    monkeypatch.setattr(fastsrt.extract, "check_unique_stems", bug)
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(TypeError, match="unsupported operand") as raised:
        main(["extract", str(tmp_path / "a.png"), "--out", str(tmp_path / "o"), *FAST])
    assert any(frame.name == "extract" for frame in raised.traceback)  # not swallowed on its way out of main


def test_unavailable_is_one_line_and_exit_1(monkeypatch, tmp_path, capsys):
    def no_gpu(*args, **kwargs):
        raise Unavailable("impl='fused' cannot run here: needs a CUDA device")

    monkeypatch.setattr(fastsrt.extract, "list_images", no_gpu)
    assert main(["extract", str(tmp_path), "--out", str(tmp_path / "o"), *FAST]) == 1
    assert capsys.readouterr().err.strip() == "fastsrt: error: impl='fused' cannot run here: needs a CUDA device"


def test_help_does_not_import_torch():
    code = ("import sys\n"
            "from fastsrt.cli import main\n"
            "for argv in ([], ['demo'], ['extract'], ['fit'], ['train-denoiser'], ['export']):\n"
            "    try:\n"
            "        main([*argv, '--help'])\n"
            "    except SystemExit:\n"
            "        pass\n"
            "print('torch imported:', 'torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("torch imported: False")
    for command in ("demo", "extract", "fit", "train-denoiser", "export"):
        assert f"usage: fastsrt {command}" in result.stdout
    assert "(default: 769)" in result.stdout and "(default: nearest)" in result.stdout  # defaults still shown


def _options_of(parser):
    """{(command, dest): action} over every subcommand."""
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    return {(name, action.dest): action for name, command in commands.items() for action in command._actions}


def test_choices_are_the_options_modules():
    expected = {"upsample": options.UPSAMPLES, "padding": options.PADDINGS, "reduce": options.REDUCES,
                "output": options.OUTPUTS, "dtype": options.DTYPE_NAMES, "cache_dtype": options.DTYPE_NAMES,
                "backend": options.BACKENDS, "precision": options.PRECISIONS, "amp": options.AMPS,
                "pretrained": tuple(options.PRETRAINED), "variant": options.DVT_VARIANTS,
                "distilled": options.DVT_VARIANTS, "video_output": options.OUTPUTS,
                "store_dtype": options.DTYPE_NAMES}
    seen = set()
    for (command, dest), action in _options_of(build_parser()).items():
        if action.choices is None:
            continue
        wanted = options.ENCODING_IMPLS if (command, dest) == ("fit", "impl") else \
            options.SRT_IMPLS if dest == "impl" else expected[dest]
        assert tuple(action.choices) == tuple(wanted), (command, dest)
        seen.add(dest)
    assert seen == {*expected, "impl"}


def test_defaults_are_the_config_dataclasses_and_signatures():
    from fastsrt.deploy import compile
    from fastsrt.dvt import DecomposeConfig, GridEncodingConfig, TrainConfig, fit_folder, train_denoiser
    from fastsrt.extract import extract
    from fastsrt.video_extract import VideoSettings

    def signature_defaults(function):
        return {name: p.default for name, p in inspect.signature(function).parameters.items()
                if p.default is not inspect.Parameter.empty}

    def field_defaults(config):
        return {name: getattr(config(), name) for name in config.__dataclass_fields__}

    for source, name, imported in [("srt.py", "SRT", signature_defaults(fastsrt.SRT)),
                                   ("extract.py", "extract", signature_defaults(extract)),
                                   ("dvt/runner.py", "fit_folder", signature_defaults(fit_folder)),
                                   ("dvt/train.py", "train_denoiser", signature_defaults(train_denoiser)),
                                   ("deploy/runtime.py", "compile", signature_defaults(compile)),
                                   ("dvt/decomposition.py", "DecomposeConfig", field_defaults(DecomposeConfig)),
                                   ("ops/grid_encoding/reference.py", "GridEncodingConfig",
                                    field_defaults(GridEncodingConfig)),
                                   ("dvt/train.py", "TrainConfig", field_defaults(TrainConfig)),
                                   ("video_extract.py", "VideoSettings", field_defaults(VideoSettings))]:
        read = defaults(source, name)
        assert read and read == {key: imported[key] for key in read}, name
    parsed = vars(build_parser().parse_args(["fit", "x", "--out", "o"]))
    config = DecomposeConfig()
    assert (parsed["views"], parsed["iterations"], parsed["cache_dtype"]) == (config.views, config.iterations,
                                                                                config.cache_dtype)
    assert parsed["levels"] == config.encoding.levels and parsed["seed"] == signature_defaults(fit_folder)["seed"]
    parsed = vars(build_parser().parse_args(["train-denoiser", "x", "--out", "o"]))
    assert (parsed["epochs"], parsed["lr"], parsed["amp"], parsed["blocks"]) == (10, None, "auto", 1)
    assert parsed["shifts"] == signature_defaults(fastsrt.SRT)["shifts"] == 3


def test_import_fastsrt_is_torch_free_and_still_makes_timm_importable():
    code = ("import sys\n"
            "import fastsrt\n"
            "assert 'torch' not in sys.modules\n"
            "import timm\n"  # on a CPU-only torch, torchvision's import is fixed on the way
            "model = timm.create_model('vit_small_patch14_dinov2', pretrained=False, depth=1)\n"
            "print(type(model).__name__, fastsrt.SRT.__name__, fastsrt.dvt.Denoiser.__name__)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["VisionTransformer", "SRT", "Denoiser"]


def test_extract_with_a_denoiser_writes_dvt_with_shifts(image_folder, tmp_path, capsys):
    """--denoiser FILE: every view denoised before the aggregation, as fastsrt.DVT(shifts=...) computes
    (the same seeded random weights: --seed 0); the denoiser's layer is used, another --layer refused."""
    import torch

    from fastsrt.dvt.denoiser import Denoiser
    from fastsrt.io import load_image, normalize, resize_to_patch_multiple

    torch.manual_seed(0)
    denoiser = Denoiser(384, grid=(2, 2), backbone="vit_small_patch14_dinov2", layer=-2).eval()
    checkpoint = denoiser.save(tmp_path / "denoiser.safetensors")
    out = tmp_path / "out"
    image = image_folder / "square.png"
    assert main(["extract", str(image), "--out", str(out), "--no-png", "--denoiser", str(checkpoint), *FAST]) == 0
    with safe_open(out / "square.safetensors", "pt") as f:
        stored, metadata = f.get_tensor("srt"), f.metadata()
    assert metadata["layer"] == "-2" and '"layer": -2' in metadata["token_transform"]

    model = fastsrt.load_timm_model("vit_small_patch14_dinov2", pretrained=False, seed=0).eval()
    dvt = fastsrt.DVT(model, Denoiser.load(checkpoint), shifts=1, output="pixel")
    batch = normalize(resize_to_patch_multiple(load_image(image), 28, 14), dvt.backbone.mean, dvt.backbone.std)
    expected = dvt(batch[None])[0]
    assert expected.shape == stored.shape and torch.allclose(stored, expected, rtol=1e-5, atol=1e-5)
    assert main(["extract", str(image), "--out", str(tmp_path / "o2"), "--no-png", "--denoiser", str(checkpoint),
                 "--layer", "3", *FAST]) == 2
    assert "not the layer the denoiser was trained on (-2)" in capsys.readouterr().err
