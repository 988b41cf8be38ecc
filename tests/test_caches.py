"""Cached artefacts that were truncated or altered after they were written are detected and rebuilt
or reported, never used as if good: the deploy cache's ONNX files and TensorRT engines, the
compiled extension in its build folder, the stage-1 files of a pairs folder. Each file is made by
the real code path, then damaged on disk."""
import json
import os
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from utils import rel_err

import fastsrt
from fastsrt import deploy
from fastsrt.cli import main
from fastsrt.deploy.cache import cached_file
from fastsrt.dvt import Denoiser, PairFolder, TrainConfig, load_pair, train_denoiser
from fastsrt.dvt.decomposition import DecomposeConfig
from fastsrt.dvt.runner import fit_folder
from fastsrt.integrity import record_path, why_not_intact
from fastsrt.io import DIGEST_KEY, load_tensors, save_tensors
from fastsrt.ops.grid_encoding import GridEncodingConfig

REPOSITORY = Path(__file__).resolve().parents[1]


def truncate(path: Path) -> None:
    """Cuts a file to half its length, as an interrupted copy does."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def alter(path: Path, start: int | None = None) -> None:
    """Inverts 64 bytes from ``start`` (default: the middle), keeping the file's length."""
    data = bytearray(path.read_bytes())
    start = len(data) // 2 if start is None else start
    data[start : start + 64] = bytes(b ^ 0xFF for b in data[start : start + 64])
    path.write_bytes(bytes(data))


def tensor_data_start(path: Path) -> int:
    """Where a safetensors file's tensor bytes begin: after the 8-byte length and the JSON header."""
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


# ----- the deploy cache: ONNX files and TensorRT engines -------------------------------------------------------

@pytest.mark.parametrize("damage", [truncate, alter, lambda path: record_path(path).unlink()],
                         ids=["truncated", "altered", "no-record"])
def test_a_damaged_cached_onnx_file_is_rebuilt(tmp_path, damage):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    denoiser = Denoiser(64, grid=(2, 2)).eval()
    tokens = torch.randn(2, 64, 2, 2)
    with torch.no_grad():
        expected = denoiser(tokens)
    first = deploy.compile(denoiser, grid=(2, 2), batch=2, backend="onnxruntime", cache_dir=tmp_path)
    onnx_path = first.files["onnx"]
    assert why_not_intact(onnx_path) == "" and record_path(onnx_path).is_file()
    damage(onnx_path)
    assert why_not_intact(onnx_path) != ""
    with pytest.warns(UserWarning, match=f"the cached ONNX file {onnx_path}.*rebuilding it"):
        again = deploy.compile(denoiser, grid=(2, 2), batch=2, backend="onnxruntime", cache_dir=tmp_path)
    assert again.files["onnx"] == onnx_path and why_not_intact(onnx_path) == ""
    assert rel_err(again(tokens), expected) <= 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # intact now: used as it is, no rebuild
        deploy.compile(denoiser, grid=(2, 2), batch=2, backend="onnxruntime", cache_dir=tmp_path)


def test_engine_files_are_rebuilt_when_damaged(tmp_path):
    """The TensorRT engine goes through the same cache function; without TensorRT here it is
    tested on an engine-named file whose build writes known bytes (atomically, as build_engine does)."""
    path = tmp_path / "engines" / "0123abcd.engine"
    builds = []

    def build(target: Path) -> None:
        builds.append(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_suffix(".tmp")
        temporary.write_bytes(b"serialized engine " * 100)
        os.replace(temporary, target)

    assert cached_file(path, build, "TensorRT engine") == path and len(builds) == 1
    assert cached_file(path, build, "TensorRT engine") == path and len(builds) == 1  # cached
    for damage, reason in [(truncate, "does not match"), (alter, "does not match"),
                           (lambda p: record_path(p).unlink(), "has no digest")]:
        damage(path)
        with pytest.warns(UserWarning, match=f"cached TensorRT engine {path} {reason}.*rebuilding it"):
            cached_file(path, build, "TensorRT engine")
        assert path.read_bytes() == b"serialized engine " * 100 and why_not_intact(path) == ""
    assert len(builds) == 4

    def killed_build(target: Path) -> None:  # a build that dies after writing part of its file in place
        target.write_bytes(b"serial")
        raise KeyboardInterrupt

    path.unlink()
    with pytest.raises(KeyboardInterrupt):
        cached_file(path, killed_build, "TensorRT engine")
    assert why_not_intact(path).startswith("does not match")  # the old record: the partial file is not used
    with pytest.warns(UserWarning, match="rebuilding it"):
        cached_file(path, build, "TensorRT engine")
    assert why_not_intact(path) == ""


# ----- the compiled extension ------------------------------------------------------------------------------------

LOAD_AND_RUN = """
import torch
from fastsrt.ops.grid_encoding import GridEncodingConfig, grid_encode_reference
from fastsrt.ops.grid_encoding.extension import build_extension, grid_encode_extension
module, problem = build_extension()
assert module is not None, problem
config = GridEncodingConfig(levels=2, features=2, log2_table_size=6, base_resolution=2, max_resolution=4)
coords, table = torch.rand(1, 50, 2), torch.randn(1, config.table_rows, 2)
got, expected = grid_encode_extension(coords, table, config), grid_encode_reference(coords, table, config)
torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
print("extension ok:", module.__file__)
"""


@pytest.mark.parametrize("damage", [truncate, alter], ids=["truncated", "altered"])
def test_a_damaged_compiled_extension_is_rebuilt_not_loaded(extension, tmp_path, damage):
    """A copy of the suite's build, its library damaged, loaded by another process (a damaged
    library can crash the process that loads it: before its digest was checked, a truncated one
    ended Python with a bus error, an altered one with a segmentation fault)."""
    build_dir = Path(extension.__file__).parent
    library = build_dir / Path(extension.__file__).name
    assert why_not_intact(library) == ""  # recorded after the build
    copy = tmp_path / "extensions" / build_dir.name
    shutil.copytree(build_dir, copy, ignore=shutil.ignore_patterns("lock", "fastsrt.lock"))
    damage(copy / library.name)
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions"), "PYTHONPATH": str(REPOSITORY)}
    env.pop("FASTSRT_NO_EXTENSION", None)
    result = subprocess.run([sys.executable, "-c", LOAD_AND_RUN], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{copy / library.name} does not match the digest recorded after it was written" in result.stderr
    assert f"extension ok: {copy / library.name}" in result.stdout
    assert why_not_intact(copy / library.name) == ""  # rebuilt and recorded again


# ----- stage-1 files in a pairs folder ---------------------------------------------------------------------------

STAGE1 = DecomposeConfig(views=2, iterations=2, size=16, tokens_per_step=16,
                         encoding=GridEncodingConfig(levels=2, features=2, log2_table_size=6, base_resolution=2,
                                                     max_resolution=4))


def colour_features(images):
    """A backbone-like callable: per 8 x 8 patch, the mean colour and its square (6 channels)."""
    colours = F.avg_pool2d(images, 8)
    return torch.cat([colours, colours**2], 1)


@pytest.fixture
def pairs(tmp_path):
    """Stage-1 files of four small images, written by fit_folder."""
    images = tmp_path / "images"
    images.mkdir()
    generator = torch.Generator().manual_seed(0)
    for stem in "abcd":
        pixels = (torch.rand(16, 16, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(images / f"{stem}.png")
    out = tmp_path / "pairs"
    backbone = fastsrt.CallableBackbone(colour_features, patch_size=8)
    report = fit_folder(images, out, backbone, STAGE1, progress=False)
    assert len(report.written) == 4
    return out


def test_stage_one_files_carry_the_digest_of_their_tensors(pairs):
    path = pairs / "a.safetensors"
    header = json.loads(path.read_bytes()[8 : tensor_data_start(path)])
    assert len(header["__metadata__"][DIGEST_KEY]) == 64
    raw, clean = load_pair(path)  # intact: loads
    assert raw.shape == clean.shape == (6, 2, 2)


def test_a_truncated_pair_file_is_named_before_training(pairs, tmp_path):
    truncate(pairs / "b.safetensors")
    with pytest.raises(ValueError, match=r"cannot read pair file '.*b\.safetensors'.*delete it"):
        PairFolder(pairs)
    with pytest.raises(ValueError, match=r"cannot read DVT stage-1 file '.*b\.safetensors'"):
        load_pair(pairs / "b.safetensors")


def test_an_altered_pair_file_is_refused_with_its_name(pairs, tmp_path, capsys):
    """Values changed inside a well-formed file: only the digest shows it. Training refuses the
    file rather than skipping it (PairFolder's documentation says why)."""
    path = pairs / "c.safetensors"
    alter(path, start=tensor_data_start(path) + 8)
    load_tensors(pairs / "a.safetensors")  # the others are intact
    with pytest.raises(ValueError, match=r"'.*c\.safetensors' is damaged or was altered"):
        load_pair(path)
    source = PairFolder(pairs)  # the header is intact: found when the file is loaded
    with pytest.raises(ValueError, match=r"c\.safetensors' is damaged or was altered.*delete it.*resumes"):
        source[source.files.index(path)]
    with pytest.raises(ValueError, match=r"c\.safetensors' is damaged"):
        train_denoiser(source, tmp_path / "d.safetensors", TrainConfig(epochs=1, batch_size=2), progress=False)
    args = ["train-denoiser", str(pairs), "--out", str(tmp_path / "d.safetensors"), "--epochs", "1",
            "--batch-size", "2", "--device", "cpu"]
    assert main(args) == 2
    err = capsys.readouterr().err  # the progress bar, and one error
    assert "Traceback" not in err and err.count("fastsrt: error: ") == 1
    assert "fastsrt: error: '" in err and "c.safetensors' is damaged or was altered" in err


def test_safetensors_files_without_a_digest_still_load(tmp_path):
    """Files written before digests existed (or by other tools) load unchecked."""
    from safetensors.torch import save_file

    tensors = {"raw": torch.randn(6, 2, 2), "clean": torch.randn(6, 2, 2)}
    save_file(tensors, str(tmp_path / "old.safetensors"))
    raw, clean = load_pair(tmp_path / "old.safetensors")
    assert torch.equal(raw, tensors["raw"]) and torch.equal(clean, tensors["clean"])
    save_tensors(tmp_path / "new.safetensors", tensors, {DIGEST_KEY: "a stale digest is replaced"})
    assert torch.equal(load_tensors(tmp_path / "new.safetensors")["raw"], tensors["raw"])


def test_an_altered_denoiser_checkpoint_is_refused_with_its_name(tmp_path):
    """Every safetensors file fastsrt writes carries its digest: a denoiser checkpoint too."""
    path = tmp_path / "den.safetensors"
    Denoiser(64, grid=2).save(path)
    alter(path, start=tensor_data_start(path) + 8)
    with pytest.raises(ValueError, match=r"den\.safetensors' is damaged or was altered"):
        Denoiser.load(path)
