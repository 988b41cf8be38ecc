"""The bad-input table: every option's bad value, rank/dtype/device mismatches, NaN and infinity, an
empty batch, a checkpoint of another backbone, a folder given for a file (and a file for a folder),
a folder with no images, symbolic-link loops, pretrained weights asked for with no network. Each
is refused with an error that names the bad value (or file) and, on the command line, one line
without a traceback. Checks of one module's own arguments stay in that module's tests; this table
holds what every entry point must refuse alike.

Not refused, by design: the denoiser does not look at its tokens' values (NaN goes through): that
would wait for the GPU at every call and cannot run inside a CUDA graph; images are checked where
they enter SRT, DVT and Backbone."""
import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from utils import tiny_vit

import fastsrt
from fastsrt import deploy, options
from fastsrt.cli import main
from fastsrt.dvt import DVT, Denoiser, PairFolder, SRTTargets, TrainConfig, distilled_backbone, load_pair
from fastsrt.dvt.decomposition import DecomposeConfig, decompose
from fastsrt.dvt.runner import fit_folder
from fastsrt.errors import Unavailable
from fastsrt.io import IMAGE_EXTENSIONS, list_images, load_image, save_tensors
from fastsrt.video import VIDEO_SUFFIXES

REPOSITORY = Path(__file__).resolve().parents[1]
OTHER_BACKBONE = "vit_base_patch14_dinov2.lvd142m"  # a tiny_vit() says it is vit_small_patch14_dinov2.lvd142m


@functools.cache
def model():
    return tiny_vit()


@functools.cache
def denoiser():
    return Denoiser(48, grid=2, backbone="vit_small_patch14_dinov2.lvd142m").eval()


def images(*shape, **kwargs):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0), **kwargs)


# ----- every option value: (the option's tuple in fastsrt.options, the call with a bad value, the value's name) ----

OPTION_ROWS = [
    ("UPSAMPLES", lambda: fastsrt.SRT(model(), 1, upsample="cubic"), "upsample='cubic'"),
    ("UPSAMPLES", lambda: DVT(model(), denoiser(), output="pixel", upsample="cubic"), "upsample='cubic'"),
    ("PADDINGS", lambda: fastsrt.SRT(model(), 1, padding="circular"), "padding='circular'"),
    ("REDUCES", lambda: fastsrt.SRT(model(), 1, reduce="max"), "reduce='max'"),
    ("OUTPUTS", lambda: fastsrt.SRT(model(), 1, output="patch"), "output='patch'"),
    ("OUTPUTS", lambda: DVT(model(), denoiser(), output="patch"), "output='patch'"),
    ("SRT_IMPLS", lambda: fastsrt.SRT(model(), 1, impl="cuda"), "impl='cuda'"),
    ("SRT_IMPLS", lambda: DVT(model(), denoiser(), shifts=1, impl="cuda"), "impl='cuda'"),
    ("ENCODING_IMPLS", lambda: decompose(torch.rand(3, 28, 28), model(), views=2, iterations=2, impl="cuda"),
     "impl='cuda'"),
    ("BACKENDS", lambda: deploy.compile(denoiser(), grid=(2, 2), backend="tvm"), "backend='tvm'"),
    ("PRECISIONS", lambda: deploy.compile(denoiser(), grid=(2, 2), precision="fp8"), "precision='fp8'"),
    ("AMPS", lambda: TrainConfig(amp="fp8").check(), "amp='fp8'"),
    ("PRETRAINED", lambda: fastsrt.SRT("vit_small_patch14_dinov2", 1, pretrained="yes"), "pretrained='yes'"),
    ("DVT_VARIANTS", lambda: Denoiser.from_pretrained("vit_base_patch14_dinov2.lvd142m", variant="coco"),
     "variant must be one of imagenet, voc, got 'coco'"),
    ("DVT_VARIANTS", lambda: distilled_backbone("vit_base_patch14_dinov2.lvd142m", variant="coco"),
     "variant must be one of imagenet, voc, got 'coco'"),
    ("DTYPE_NAMES", lambda: DecomposeConfig(cache_dtype="float64"), "cache_dtype='float64'"),
    ("DTYPE_NAMES", lambda: DecomposeConfig(backbone_dtype="int8"), "backbone_dtype='int8'"),
    ("DTYPE_NAMES", lambda: options.torch_dtype("float8"), "dtype 'float8'"),
    ("DTYPE_NAMES", lambda: fastsrt.SRT(model(), 1, dtype=torch.int8), "dtype=torch.int8"),
]


@pytest.mark.parametrize("option,call,named", OPTION_ROWS, ids=[f"{row[0]}:{row[2]}" for row in OPTION_ROWS])
def test_a_bad_option_value_is_named(option, call, named):
    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace(".", r"\.")):
        call()


def test_the_option_table_covers_every_option():
    every = {name for name, value in vars(options).items() if name.isupper() and isinstance(value, (tuple, dict))}
    every -= {"PRECISION_DTYPES"}  # not an option: the map behind torch_dtype, covered by its rows
    assert every == {row[0] for row in OPTION_ROWS}


@pytest.mark.parametrize("flag", ["--upsample", "--padding", "--reduce", "--output", "--impl", "--pretrained"])
def test_the_command_line_refuses_a_bad_choice(flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["extract", str(tmp_path), "--out", str(tmp_path / "out"), flag, "bogus"])
    assert exit_.value.code == 2 and f"argument {flag}: invalid choice: 'bogus'" in capsys.readouterr().err


# ----- rank, dtype, device, values, empty batches: every entry point that takes images ---------------------------

ENTRY_POINTS = {
    "SRT": lambda batch: fastsrt.SRT(model(), 1)(batch),
    "DVT": lambda batch: DVT(model(), denoiser())(batch),
    "Backbone": lambda batch: fastsrt.Backbone(model())(batch),
}
NAN = images(1, 3, 28, 28)
NAN[0, 1, 3, 4] = float("nan")
IMAGE_ROWS = [
    ("rank 3", images(3, 28, 28), ValueError, r"shape \(B, C, H, W\), got shape \(3, 28, 28\)"),
    ("rank 5", images(1, 1, 3, 28, 28), ValueError, r"shape \(B, C, H, W\), got shape \(1, 1, 3, 28, 28\)"),
    ("4 channels", images(1, 4, 28, 28), ValueError, "3 channels"),
    ("integer dtype", torch.zeros(1, 3, 28, 28, dtype=torch.uint8), TypeError, "floating-point.*torch.uint8"),
    ("float64 for a float32 model", images(1, 3, 28, 28, dtype=torch.float64), TypeError,
     "images are float64 but the model is torch.float32"),
    ("another device", images(1, 3, 28, 28, device="meta"), ValueError,
     "images are on meta but the model is on cpu"),
    ("NaN", NAN, ValueError, "1 NaN or infinite values"),
    ("infinity", torch.full((1, 3, 28, 28), float("-inf")), ValueError, "2352 NaN or infinite values"),
    ("empty batch", images(0, 3, 28, 28), ValueError, r"empty batch \(shape \(0, 3, 28, 28\)\)"),
    ("smaller than a patch", images(1, 3, 10, 28), ValueError, "smaller than one patch"),
    ("not a tensor", [[0.0]], TypeError, "torch.Tensor"),
]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("label,batch,error,match", IMAGE_ROWS, ids=[row[0] for row in IMAGE_ROWS])
def test_bad_image_batches_are_named(entry, label, batch, error, match):
    with pytest.raises(error, match=match):
        ENTRY_POINTS[entry](batch)


def test_a_model_on_another_device_than_the_images_is_named():
    meta_model = tiny_vit().to("meta")
    for call in (lambda: fastsrt.SRT(meta_model, 1)(images(1, 3, 28, 28)),
                 lambda: fastsrt.Backbone(meta_model)(images(1, 3, 28, 28))):
        with pytest.raises(ValueError, match="images are on cpu but the model is on meta"):
            call()


TOKEN_ROWS = [
    ("rank 3", images(48, 2, 2), ValueError, r"shape \(B, C, h, w\)"),
    ("other channels", images(1, 64, 2, 2), ValueError, "takes 48-channel tokens.*another backbone"),
    ("integer dtype", torch.zeros(1, 48, 2, 2, dtype=torch.int64), TypeError, "floating point"),
    ("float64", images(1, 48, 2, 2, dtype=torch.float64), TypeError,
     "tokens are float64 but the model is torch.float32"),
    ("another device", images(1, 48, 2, 2, device="meta"), ValueError, "tokens are on meta but the model is on cpu"),
    ("empty batch", images(0, 48, 2, 2), ValueError, "empty batch"),
]


@pytest.mark.parametrize("label,tokens,error,match", TOKEN_ROWS, ids=[row[0] for row in TOKEN_ROWS])
def test_bad_token_grids_for_the_denoiser_are_named(label, tokens, error, match):
    with pytest.raises(error, match=match), torch.no_grad():
        denoiser()(tokens)


def test_the_denoiser_does_not_inspect_token_values():
    tokens = images(1, 48, 2, 2)
    tokens[0, 0, 0, 0] = float("nan")
    with torch.no_grad():
        assert denoiser()(tokens).isnan().any()


# ----- a checkpoint of another backbone ---------------------------------------------------------------------------

def test_a_checkpoint_of_another_backbone_is_refused(tmp_path):
    other = Denoiser(48, grid=2, backbone=OTHER_BACKBONE)
    path = tmp_path / "vit_b.safetensors"
    other.save(path)
    with pytest.raises(ValueError, match=f"is a denoiser for {OTHER_BACKBONE}, not for vit_small_patch14_dinov2"):
        DVT(model(), path)
    with pytest.raises(ValueError, match=f"trained on {OTHER_BACKBONE}, not on vit_small_patch14_dinov2"):
        DVT(model(), other)
    with pytest.raises(ValueError, match="takes 64-channel tokens but vit_small_patch14_dinov2.lvd142m gives 48"):
        DVT(model(), Denoiser(64, grid=2))  # no backbone recorded: the channel count tells
    with pytest.raises(ValueError, match="does not belong to"):
        deploy.compile_pipeline(model(), other, (28, 28), backend="torch", device="cpu")


# ----- files and folders --------------------------------------------------------------------------------------------

def test_a_folder_given_for_a_file_and_a_file_for_a_folder_are_named(tmp_path, capsys):
    folder = tmp_path / "den.safetensors"
    folder.mkdir()
    with pytest.raises(ValueError, match="den.safetensors' is a folder, not a denoiser checkpoint"):
        Denoiser.load(folder)
    with pytest.raises(ValueError, match="is a folder, not a denoiser checkpoint"):
        DVT(model(), folder)
    with pytest.raises(ValueError, match="is a folder, not a DVT stage-1 file"):
        load_pair(folder)
    with pytest.raises(ValueError, match="cannot read image .*den.safetensors.*Is a directory"):
        load_image(folder)
    pair = tmp_path / "pair.safetensors"
    save_tensors(pair, {"raw": torch.zeros(48, 2, 2), "clean": torch.zeros(48, 2, 2)})
    with pytest.raises(ValueError, match="pair.safetensors' is a file; training takes the folder"):
        PairFolder(pair)
    assert main(["export", str(folder), "--out", str(tmp_path / "out")]) == 2
    expected = f"{str(folder)!r} is a folder, not a denoiser checkpoint (.safetensors or .pth)"
    assert capsys.readouterr().err.strip() == f"fastsrt: error: {expected}"


def test_a_folder_with_no_images_is_refused(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="empty' holds no images"):
        list_images([empty])
    with pytest.raises(ValueError, match="empty' holds no images"):
        fit_folder(empty, tmp_path / "out", model(), progress=False)
    with pytest.raises(ValueError, match="empty' holds no images"):
        SRTTargets(empty, fastsrt.SRT(model(), 1, output="token"))
    with pytest.raises(ValueError, match="holds no .safetensors pair files"):
        PairFolder(empty)
    assert main(["extract", str(empty), "--out", str(tmp_path / "out"), "--model", "vit_small_patch14_dinov2",
                 "--pretrained", "no"]) == 2
    expected = f"{str(empty)!r} holds no images or videos ({', '.join(IMAGE_EXTENSIONS + VIDEO_SUFFIXES)})"
    assert capsys.readouterr().err.strip() == f"fastsrt: error: {expected}"


def test_symbolic_link_loops_are_reported_not_followed(tmp_path, capsys):
    """A folder holding two links to each other, a link to itself and a link to the folder: the
    listing ends, the looping links are that file's failure, the good image is processed."""
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(folder / "good.png")
    os.symlink(folder / "b.png", folder / "a.png")
    os.symlink(folder / "a.png", folder / "b.png")
    os.symlink(folder / "self.jpg", folder / "self.jpg")
    os.symlink(folder, folder / "up.png")  # a folder loop with an image's name
    assert [p.name for p in list_images([folder])] == ["a.png", "b.png", "good.png", "self.jpg"]
    with pytest.raises(FileNotFoundError, match="self.jpg' is a symbolic link that leads nowhere"):
        list_images([folder / "self.jpg"])
    out = tmp_path / "out"
    args = ["extract", str(folder), "--out", str(out), "--model", "vit_small_patch14_dinov2", "--pretrained", "no",
            "--shifts", "1", "--size", "28", "--output", "token", "--no-png"]
    assert main(args) == 1  # the looping links failed
    captured = capsys.readouterr()
    assert "1 written, 0 already done (skipped), 3 failed" in captured.out and "Traceback" not in captured.err
    for name in ("a.png", "b.png", "self.jpg"):
        assert re.search(rf"cannot read image '[^']*{name}'.*Too many levels of symbolic links", captured.err)
    assert sorted(p.name for p in out.iterdir()) == ["good.safetensors"]
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    os.symlink(pairs / "loop.safetensors", pairs / "loop.safetensors")
    with pytest.raises(ValueError, match="cannot read pair file .*loop.safetensors"):
        PairFolder(pairs)


# ----- pretrained weights with no network ---------------------------------------------------------------------------

OFFLINE = """
import sys, time
import fastsrt
from fastsrt.errors import Unavailable
SRT = fastsrt.SRT  # imported before the clock starts
start = time.perf_counter()
try:
    SRT("vit_small_patch14_dinov2.lvd142m")
except Unavailable as error:
    print(f"{time.perf_counter() - start:.1f} s: {error}")
if len(sys.argv) > 1:
    from fastsrt.cli import main
    print("exit", main(sys.argv[1:]))
"""


@pytest.mark.parametrize("setting", ["HF_HUB_OFFLINE=1", "HF_ENDPOINT=http://127.0.0.1:9"],
                         ids=["offline", "unreachable"])
def test_pretrained_weights_with_no_network_fail_at_once_saying_what_to_do(setting, tmp_path):
    """With huggingface_hub offline, or its endpoint unreachable (a closed local port: no network
    is needed), and an empty cache: an Unavailable naming the weights and the remedies in
    seconds, not huggingface_hub's retries (about a minute) and its LocalEntryNotFoundError."""
    variable, value = setting.split("=", 1)
    env = {key: value for key, value in os.environ.items()
           if key not in ("HF_HUB_OFFLINE", "HF_ENDPOINT", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")}
    env.update({variable: value, "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPOSITORY)})
    image = tmp_path / "image.png"
    Image.new("RGB", (28, 28)).save(image)
    cli = ["extract", str(image), "--out", str(tmp_path / "out"), "--model", "vit_small_patch14_dinov2.lvd142m",
           "--pretrained", "yes"] if variable == "HF_HUB_OFFLINE" else []
    result = subprocess.run([sys.executable, "-c", OFFLINE, *cli], env=env, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    seconds, message = result.stdout.splitlines()[0].split(" s: ", 1)
    assert float(seconds) < 10
    reason = ("HF_HUB_OFFLINE is set" if variable == "HF_HUB_OFFLINE" else "http://127.0.0.1:9 cannot be reached")
    assert message.startswith(f"the pretrained weights of vit_small_patch14_dinov2.lvd142m could not be had: "
                              f"{reason} and the Hugging Face cache ({tmp_path / 'hf' / 'hub'}) has no copy")
    remedies = ("pretrained=False, --pretrained no", "pretrained_cfg_overlay={'file': PATH}", "they are then cached")
    for remedy in remedies:
        assert remedy in message
    if cli:
        assert result.stdout.splitlines()[-1] == "exit 1"
        assert "fastsrt: error: the pretrained weights of vit_small_patch14_dinov2.lvd142m could not be had" \
            in result.stderr and "Traceback" not in result.stderr


def test_pretrained_auto_offline_still_falls_back_to_random_weights(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 sets it
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.warns(UserWarning, match="no pretrained weights for vit_small_patch14_dinov2.*RANDOM weights"):
        backbone = fastsrt.Backbone("vit_small_patch14_dinov2", pretrained="auto", depth=1, embed_dim=48, num_heads=2)
    assert backbone.embed_dim == 48
    with pytest.raises(Unavailable, match="HF_HUB_OFFLINE is set"):
        fastsrt.load_timm_model("vit_small_patch14_dinov2", pretrained=True, depth=1, embed_dim=48, num_heads=2)
