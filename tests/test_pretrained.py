"""The DVT authors' released checkpoints by name, offline, from a Hugging Face cache laid out as
huggingface_hub lays it out, holding small checkpoints written here in the authors' formats."""
import hashlib
import io
import os
import subprocess
import sys

import pytest
import torch
from huggingface_hub import constants, hf_hub_download, scan_cache_dir

import fastsrt
from fastsrt.backbone import load_timm_model, model_name
from fastsrt.cli import main
from fastsrt.dvt import Denoiser, distilled_backbone, pretrained
from fastsrt.errors import Unavailable

BASE = "vit_base_patch14_dinov2.lvd142m"  # released: denoisers and distilled ViTs, ImageNet and VOC
SMALL = "vit_small_patch14_dinov2.lvd142m"  # released: a VOC denoiser only
COMMIT = "4f1c0e0a7d9b8c6e5a3f2d1b0c9e8a7f6d5c4b3a"
TINY_VIT = {"depth": 1, "embed_dim": 48, "num_heads": 2, "img_size": 56}  # the architecture of BASE, shrunk


def put_in_hub_cache(cache, filename, data: bytes, symlink: bool = True):
    """Puts ``data`` into a hub cache as huggingface_hub does: the bytes in blobs/<sha256>,
    snapshots/<commit>/<filename> a relative link to them, refs/main naming the commit. Without
    symlinks (as on Windows) the snapshot holds the file itself."""
    repo = cache / f"models--{pretrained.REPO_ID.replace('/', '--')}"
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    link = repo / "snapshots" / COMMIT / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    if symlink:
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link.symlink_to(os.path.relpath(blob, link.parent))
    else:
        link.write_bytes(data)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return link


def saved(checkpoint: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return buffer.getvalue()


def authors_denoiser(dim=64, grid=(3, 3), seed=0) -> dict:
    """A denoiser's weights under the authors' names (denoiser.*, pos_embed), random."""
    torch.manual_seed(seed)
    state = Denoiser(dim, grid).state_dict()
    return {name: torch.randn_like(value) for name, value in state.items()}


def authors_distilled(seed=0) -> dict:
    """A tiny BASE-architecture ViT's weights as the authors save a distilled one: "model.<timm name>"."""
    state = load_timm_model(BASE, pretrained=False, seed=seed, **TINY_VIT).state_dict()
    return {f"model.{name}": value for name, value in state.items()}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty hub cache, offline: huggingface_hub read these variables at its import, so its
    constants are set too (the subprocess test below sets only the variables)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_the_cache_layout_is_the_one_huggingface_hub_resolves(hub):
    data = saved({"denoiser": authors_denoiser()})
    link = put_in_hub_cache(hub, f"voc_denoised/{SMALL}.pth", data)
    assert hf_hub_download(pretrained.REPO_ID, f"voc_denoised/{SMALL}.pth", local_files_only=True) == str(link)
    with pytest.raises(FileNotFoundError):
        hf_hub_download(pretrained.REPO_ID, f"voc_denoised/{BASE}.pth", local_files_only=True)
    (repo,) = scan_cache_dir(hub).repos  # huggingface_hub's own reading of the cache finds nothing amiss
    assert repo.repo_id == pretrained.REPO_ID and repo.refs["main"].commit_hash == COMMIT
    (file,) = repo.refs["main"].files
    assert file.file_name == f"{SMALL}.pth" and file.size_on_disk == len(data)


def test_each_variant_loads_exactly_its_own_file(hub):
    states = {variant: authors_denoiser(seed=seed) for seed, variant in enumerate(["imagenet", "voc"])}
    put_in_hub_cache(hub, f"imgnet_denoised/{BASE}.pth", saved({"denoiser": states["imagenet"]}))
    put_in_hub_cache(hub, f"voc_denoised/{BASE}.pth", saved({"denoiser": states["voc"]}))
    for variant, expected in [("imagenet", states["imagenet"]), ("voc", states["voc"]), (None, states["imagenet"])]:
        denoiser = Denoiser.from_pretrained(BASE, variant=variant)
        loaded = denoiser.state_dict()
        assert loaded.keys() == expected.keys()
        assert all(torch.equal(loaded[name], expected[name]) for name in expected), variant
        assert denoiser.backbone == BASE and denoiser.grid == (3, 3) and not denoiser.training
    tokens = torch.randn(2, 64, 3, 3)
    with torch.no_grad():  # the ImageNet and VOC denoisers differ: the variant is not ignored somewhere
        assert not torch.allclose(Denoiser.from_pretrained(BASE, "voc")(tokens), Denoiser.from_pretrained(BASE)(tokens))


def test_a_backbone_released_with_voc_only_defaults_to_it_and_refuses_imagenet(hub):
    state = authors_denoiser(seed=3)
    put_in_hub_cache(hub, f"voc_denoised/{SMALL}.pth", saved({"denoiser": state}))
    assert torch.equal(Denoiser.from_pretrained(SMALL).pos_embed.detach(), state["pos_embed"])
    with pytest.raises(ValueError, match=r"no 'imagenet' denoiser for vit_small_patch14_dinov2.lvd142m; it has: voc"):
        Denoiser.from_pretrained(SMALL, "imagenet")
    with pytest.raises(ValueError, match="variant must be one of imagenet, voc, got 'coco'"):
        Denoiser.from_pretrained(SMALL, "coco")


def test_distilled_backbone_loads_the_authors_weights_and_runs_in_srt(hub):
    state = authors_distilled(seed=1)
    put_in_hub_cache(hub, f"voc_distilled/{BASE}.pth", saved({"model": state}))
    model = distilled_backbone(BASE, "voc", **TINY_VIT)
    loaded = model.state_dict()
    assert {f"model.{name}" for name in loaded} == state.keys()
    assert all(torch.equal(value, state[f"model.{name}"]) for name, value in loaded.items())
    assert model_name(model) == BASE and not model.training  # fastsrt.DVT checks a denoiser against this name
    reference = load_timm_model(BASE, pretrained=False, **TINY_VIT).eval()
    reference.load_state_dict({name.removeprefix("model."): value for name, value in state.items()})
    images = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        expected = fastsrt.SRT(reference, shifts=1, output="token")(images)
        actual = fastsrt.SRT(model, shifts=1, output="token")(images)
    assert torch.equal(actual, expected)
    with pytest.raises(Unavailable, match="imgnet_distilled/"):  # the ImageNet one is not cached here
        distilled_backbone(BASE, **TINY_VIT)


def test_unknown_names_list_the_known_ones(hub):
    with pytest.raises(ValueError, match="no released DVT denoiser for 'vit_tiny_patch16_224'; known names: deit3"):
        Denoiser.from_pretrained("vit_tiny_patch16_224")
    with pytest.raises(ValueError, match=f"no released DVT distilled backbone for '{SMALL}'.*{BASE}") as error:
        distilled_backbone(SMALL)
    assert SMALL not in str(error.value).split("known names:")[1]
    assert pretrained.known_names("distilled") == sorted(pretrained.RELEASE["voc_distilled"])


def test_offline_without_a_cached_copy_is_one_line_naming_the_file(hub):
    with pytest.raises(Unavailable) as error:
        Denoiser.from_pretrained(BASE, "voc")
    message = str(error.value)
    assert "\n" not in message and f"jjiaweiyang/DVT/voc_denoised/{BASE}.pth" in message
    assert "HF_HUB_OFFLINE is set" in message and str(hub) in message and "hf download" in message


@pytest.mark.parametrize("symlink", [True, False], ids=["blob", "no-symlinks"])
def test_a_damaged_cached_copy_is_refused_by_name(hub, symlink):
    data = saved({"denoiser": authors_denoiser()})
    link = put_in_hub_cache(hub, f"voc_denoised/{BASE}.pth", data, symlink=symlink)
    link.resolve().write_bytes(data[: len(data) // 2])  # truncated in place, as by a full disk
    # with blobs, the cache's sha256 names the damage; without, reading the checkpoint fails
    message = "the cached copy of jjiaweiyang/DVT/voc_denoised/.* is damaged" if symlink else \
        "cannot read denoiser checkpoint .*voc_denoised"
    with pytest.raises(ValueError, match=message):
        Denoiser.from_pretrained(BASE, "voc")
    distilled = put_in_hub_cache(hub, f"voc_distilled/{BASE}.pth", saved({"model": authors_distilled()}), symlink)
    distilled.resolve().write_bytes(b"\0" * 100)
    with pytest.raises(ValueError, match="is damaged" if symlink else "cannot read distilled checkpoint"):
        distilled_backbone(BASE, "voc", **TINY_VIT)


def test_a_distilled_file_of_another_shape_or_layout_is_named(hub, tmp_path):
    put_in_hub_cache(hub, f"voc_distilled/{BASE}.pth", saved({"model": authors_distilled()}))
    with pytest.raises(ValueError, match=f"does not hold the weights of a {BASE}: "):
        distilled_backbone(BASE, "voc", **{**TINY_VIT, "embed_dim": 64})
    unprefixed = tmp_path / "plain.pth"
    torch.save({"model": {k.removeprefix("model."): v for k, v in authors_distilled().items()}}, unprefixed)
    with pytest.raises(ValueError, match=r"distilled weights are named 'model\.\*'; found blocks"):
        pretrained.load_distilled(unprefixed, BASE, **TINY_VIT)
    torch.save({"denoiser": authors_denoiser()}, tmp_path / "denoiser.pth")
    with pytest.raises(ValueError, match="no 'model' state dict"):
        pretrained.load_distilled(tmp_path / "denoiser.pth", BASE, **TINY_VIT)


def test_cli_export_takes_a_released_name(hub, tmp_path, capsys):
    put_in_hub_cache(hub, f"voc_denoised/{SMALL}.pth", saved({"denoiser": authors_denoiser()}))
    arguments = ["export", SMALL, "--out", str(tmp_path / "out"), "--backend", "torch", "--device", "cpu",
                 "--repeat", "1"]
    assert main([*arguments, "--variant", "voc"]) == 0
    assert "input (B<=1, 64, 3, 3)" in capsys.readouterr().out
    assert main([*arguments, "--variant", "imagenet"]) == 2
    assert capsys.readouterr().err.strip() == (f"fastsrt: error: the DVT release has no 'imagenet' denoiser for "
                                               f"{SMALL}; it has: voc")
    assert main(["export", "vit_tiny", *arguments[2:]]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "'vit_tiny' is neither a denoiser checkpoint file nor" in error and BASE in error
    assert main(["export", BASE, *arguments[2:]]) == 1  # released, not cached, offline
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and f"imgnet_denoised/{BASE}.pth is not in the Hugging Face cache" in error
    assert main([*arguments, "--model", BASE]) == 2  # a denoiser for another backbone
    assert f"is for {SMALL}, not for --model {BASE}" in capsys.readouterr().err


def test_cli_distilled_option_reads_the_release(hub, tmp_path, capsys):
    # a tiny checkpoint cannot fill the full-size ViT the command builds: the error names the file
    put_in_hub_cache(hub, f"voc_distilled/{BASE}.pth", saved({"model": authors_distilled()}))
    arguments = ["demo", "--model", BASE, "--out", str(tmp_path / "out"), "--device", "cpu"]
    assert main([*arguments, "--distilled", "voc"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and f"voc_distilled/{BASE}.pth' does not hold the weights of a {BASE}" in error
    assert main([*arguments, "--distilled", "imagenet"]) == 1
    assert f"imgnet_distilled/{BASE}.pth is not in the Hugging Face cache" in capsys.readouterr().err


def test_hf_home_and_offline_variables_are_honoured_in_a_fresh_process(tmp_path):
    state = authors_denoiser(seed=5)
    put_in_hub_cache(tmp_path / "home" / "hub", f"voc_denoised/{SMALL}.pth", saved({"denoiser": state}))
    code = ("import sys, torch\n"
            "from fastsrt.dvt import Denoiser\n"
            f"den = Denoiser.from_pretrained({SMALL!r})\n"
            "torch.save(den.state_dict(), sys.argv[1])\n")
    env = {**os.environ, "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out.pt")], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    loaded = torch.load(tmp_path / "out.pt", weights_only=True)
    assert all(torch.equal(loaded[name], state[name]) for name in state)
