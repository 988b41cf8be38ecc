"""`fastsrt extract` under torchrun: two CPU processes (gloo) share the images and videos out, each
input written by one of them, and rank 0 prints one summary for all."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fastsrt.io import load_tensors
from fastsrt.video import write_video

pytest.importorskip("av")

FAST = ["--model", "test_vit", "--pretrained", "no", "--shifts", "1", "--size", "32", "--no-preview", "--no-png"]


def torchrun_extract(folder, out):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "fastsrt.cli", "extract", str(folder), "--out", str(out), *FAST]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=400, env=environment)


def test_two_processes_write_every_input_once_and_one_summary(tmp_path):
    folder = tmp_path / "inputs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg", "c.png"):
        Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(folder / name)
    for name, codec in (("d.mp4", "libx264"), ("e.webm", "libvpx-vp9")):
        write_video(folder / name, [rng.integers(0, 255, (32, 48, 3), dtype=np.uint8) for _ in range(3)], 10, codec)
    (folder / "f.png").write_bytes(b"not an image")
    out = tmp_path / "out"

    result = torchrun_extract(folder, out)
    assert result.returncode != 0, result.stdout + result.stderr  # f.png failed: exit 1 from rank 0
    summaries = [line for line in result.stdout.splitlines() if line.startswith("fastsrt extract: ")]
    # 5 written by the two ranks together, with every output present: each input was written exactly once
    assert summaries == [f"fastsrt extract: 5 written, 0 already done (skipped), 1 failed -> {out}"], result.stdout
    assert sorted(p.name for p in out.iterdir()) == [f"{stem}.safetensors" for stem in "abcde"]
    assert load_tensors(out / "d.safetensors")["srt"].shape == (3, 64, 2, 3)
    assert result.stderr.count("  failed: cannot read image") == 1 and "f.png" in result.stderr

    (folder / "f.png").unlink()
    written = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    result = torchrun_extract(folder, out)  # resumed: nothing redone
    assert result.returncode == 0, result.stdout + result.stderr
    summaries = [line for line in result.stdout.splitlines() if line.startswith("fastsrt extract: ")]
    assert summaries == [f"fastsrt extract: 0 written, 5 already done (skipped), 0 failed -> {out}"], result.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == written
