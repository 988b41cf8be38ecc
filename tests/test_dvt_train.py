"""Training the denoiser: the loss falls, a run resumes exactly, DDP equals one process, bad data is named."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from utils import rel_err, tiny_vit

import fastsrt
from fastsrt.cli import main
from fastsrt.dvt import Denoiser, PairFolder, SRTTargets, TrainConfig, denoiser_loss, train_denoiser
from fastsrt.dvt.schedule import warmup_cosine
from fastsrt.dvt.train import state_path_for
from fastsrt.io import save_tensors

C, K = 64, 5


def write_pairs(folder, count=16, seed=0):
    """clean: random smooth fields; raw = clean + one fixed position pattern + a little noise."""
    generator = torch.Generator().manual_seed(seed)
    pattern = 2 * torch.randn(C, K, K, generator=generator)
    for i in range(count):
        clean = F.avg_pool2d(torch.randn(1, C, K + 2, K + 2, generator=generator), 3, stride=1)[0]
        raw = clean + pattern + 0.05 * torch.randn(C, K, K, generator=generator)
        save_tensors(folder / f"img{i:03d}.safetensors", {"raw": raw, "clean": clean, "artifact": pattern},
                     {"model": "vit_small_patch14_dinov2.lvd142m", "layer": -1, "image_size": 70, "patch_size": 14})
    return folder


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("pairs"))


def weights(denoiser):
    return {k: v.clone() for k, v in denoiser.state_dict().items()}


CONFIG = TrainConfig(epochs=6, batch_size=4, lr=2e-3, save_every=1000)


def test_loss_falls_and_a_resumed_run_is_identical(pairs, tmp_path):
    source = PairFolder(pairs)
    assert (source.dim, source.grid, source.layer) == (C, (K, K), -1)
    assert source.backbone == "vit_small_patch14_dinov2.lvd142m"
    full = train_denoiser(source, tmp_path / "full.safetensors", CONFIG, progress=False)
    assert full.finished and len(full.losses) == 24
    assert np.mean(full.losses[-4:]) < 0.6 * np.mean(full.losses[:4])

    first = train_denoiser(source, tmp_path / "split.safetensors", CONFIG, stop_after=9, progress=False)
    assert not first.finished and first.step == 9 and not (tmp_path / "split.safetensors").exists()
    resumed = train_denoiser(source, tmp_path / "split.safetensors", CONFIG, progress=False)
    assert resumed.finished and resumed.losses == full.losses
    a, b = weights(full.denoiser), weights(resumed.denoiser)
    assert all(torch.equal(a[k], b[k]) for k in a)

    saved = Denoiser.load(tmp_path / "split.safetensors")
    assert saved.config == resumed.denoiser.config and saved.backbone == "vit_small_patch14_dinov2.lvd142m"
    raw = torch.randn(2, C, K, K)
    assert torch.equal(saved(raw), resumed.denoiser(raw))


def test_resume_refuses_other_settings(pairs, tmp_path):
    source = PairFolder(pairs)
    train_denoiser(source, tmp_path / "d.safetensors", CONFIG, stop_after=2, progress=False)
    other = TrainConfig(epochs=6, batch_size=4, lr=1e-3, save_every=1000)
    with pytest.raises(ValueError, match="other settings"):
        train_denoiser(source, tmp_path / "d.safetensors", other, progress=False)
    restarted = train_denoiser(source, tmp_path / "d.safetensors", other, resume=False, stop_after=1, progress=False)
    assert restarted.step == 1


def test_paper_schedule_and_loss():
    config = TrainConfig()
    assert config.base_lr() == pytest.approx(2e-4 * math.sqrt(64 / 256))
    total, warm = 1000, 150
    rates = [warmup_cosine(s, total, 1e-4, 1e-6, warm) for s in range(total)]
    assert rates[0] == pytest.approx(1e-4 / 150) and rates[149] == pytest.approx(1e-4)
    assert all(a <= b for a, b in zip(rates[:150], rates[1:150]))
    assert all(a >= b for a, b in zip(rates[150:], rates[151:]))
    assert rates[-1] == pytest.approx(1e-6)

    prediction, target = torch.randn(3, 8, 4, 5), torch.randn(3, 8, 4, 5)
    cosine = (prediction * target).sum(1) / (prediction.norm(dim=1) * target.norm(dim=1))
    expected = ((prediction - target) ** 2).mean() + 1 - cosine.mean()
    assert denoiser_loss(prediction, target).item() == pytest.approx(expected.item(), rel=1e-6)


def test_ddp_under_torchrun_equals_one_process(pairs, tmp_path):
    config = TrainConfig(epochs=1, batch_size=4, lr=2e-3, save_every=1000)
    single = train_denoiser(PairFolder(pairs), tmp_path / "single.safetensors", config, progress=False)
    # --standalone: torchrun picks a free rendezvous port itself (no race with a probed one)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "fastsrt.cli", "train-denoiser", str(pairs), "--out", str(tmp_path / "ddp.safetensors"),
               "--epochs", "1", "--batch-size", "4", "--lr", "2e-3", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = Denoiser.load(tmp_path / "ddp.safetensors")
    flat = [torch.cat([v.flatten() for v in weights(d).values()]) for d in (single.denoiser, ddp)]
    assert rel_err(flat[1], flat[0]) <= 1e-5  # gradients averaged over ranks = the global batch's


def test_srt_targets_on_the_fly(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8)).save(images / f"{i}.png")
    model = tiny_vit(embed_dim=64)
    srt = fastsrt.SRT(model, shifts=1, output="token")
    source = SRTTargets(images, srt, size=28)
    assert (len(source), source.dim, source.grid) == (4, 64, (2, 2))
    assert source.backbone == "vit_small_patch14_dinov2.lvd142m"
    batch = torch.stack([source[0], source[1]])
    raw, target = source.make_pairs(batch, torch.device("cpu"))
    with torch.no_grad():
        expected_raw = model.forward_features(batch)[:, 1:].transpose(1, 2).reshape(2, 64, 2, 2)
    assert rel_err(raw, expected_raw) <= 1e-6
    assert rel_err(target, srt(batch)) == 0
    result = train_denoiser(source, tmp_path / "srt.safetensors", TrainConfig(epochs=1, batch_size=2), progress=False)
    assert result.finished and result.denoiser.grid == (2, 2)
    with pytest.raises(ValueError, match="output='token'"):
        SRTTargets(images, fastsrt.SRT(model, shifts=1), size=28)
    with pytest.raises(ValueError, match="multiple of the patch"):
        SRTTargets(images, srt, size=30)


def test_bad_pair_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError):
        PairFolder(tmp_path / "missing")
    with pytest.raises(ValueError, match="no .safetensors"):
        PairFolder(tmp_path)
    save_tensors(tmp_path / "a.safetensors", {"raw": torch.randn(C, K, K), "clean": torch.randn(C, K, K)})
    save_tensors(tmp_path / "b.safetensors", {"raw": torch.randn(C, K, K)})
    with pytest.raises(ValueError, match="b.safetensors.*no 'clean'"):
        PairFolder(tmp_path)
    save_tensors(tmp_path / "b.safetensors", {"raw": torch.randn(C, K, K), "clean": torch.randn(C, K + 1, K)})
    with pytest.raises(ValueError, match="b.safetensors.*must be equal"):
        PairFolder(tmp_path)
    (tmp_path / "b.safetensors").write_bytes(b"broken")
    with pytest.raises(ValueError, match="cannot read pair file.*b.safetensors"):
        PairFolder(tmp_path)
    bad = torch.randn(C, K, K)
    bad[0, 0, 0] = float("nan")
    save_tensors(tmp_path / "b.safetensors", {"raw": bad, "clean": torch.randn(C, K, K)})
    with pytest.raises(ValueError, match="b.safetensors.*NaN"):
        PairFolder(tmp_path)[1]
    with pytest.raises(ValueError, match="fewer than one batch"):
        train_denoiser(PairFolder(tmp_path), tmp_path / "d.safetensors", TrainConfig(batch_size=64), progress=False)
    with pytest.raises(ValueError, match="amp"):
        train_denoiser(PairFolder(tmp_path), tmp_path / "d.safetensors", TrainConfig(amp="fp8"), progress=False)


def test_cli_trains_stops_and_resumes(pairs, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    arguments = ["train-denoiser", str(pairs), "--out", str(out), "--epochs", "2", "--batch-size", "4", "--lr", "2e-3"]
    assert main(arguments + ["--stop-after", "3"]) == 0
    assert "stopped at step 3 of 8" in capsys.readouterr().out and state_path_for(out).exists()
    assert main(arguments) == 0
    assert "8 steps" in capsys.readouterr().out and Denoiser.load(out).dim == C
    assert main(["train-denoiser", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    assert "no such folder" in capsys.readouterr().err
