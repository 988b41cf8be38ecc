import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from fastsrt.cli import main

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
    assert main(["extract", str(image_folder / "square.png"), "--out", str(out), "--output", "token", "--no-png", *FAST]) == 0
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
    result = subprocess.run([str(command), "demo", "--out", str(tmp_path), *FAST], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "SRT (10 views" in result.stdout and str(tmp_path / "demo.png") in result.stdout
    assert Image.open(tmp_path / "demo.png").size[1] > 28
    with safe_open(tmp_path / "demo.safetensors", "pt") as f:
        assert f.get_tensor("srt").shape == (384, 28, 28)
