"""The fused shift + patchify + patch-embedding kernel (Triton; TRITON_INTERPRET=1 without a GPU)
against timm's own patch_embed on explicitly shifted images."""
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from timm.layers import PatchEmbed
from torch import nn
from utils import rel_err, tiny_vit

from fastsrt import errors
from fastsrt.errors import Unavailable
from fastsrt.ops import patch_embed as pe
from fastsrt.ops.shift import shift_images

# where the kernel runs compiled: conftest.py sets TRITON_INTERPRET=1 only without a GPU
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# duplicates, a zero shift, shifts larger than a patch, negative ones
SHIFTS = [(0, 0), (3, -5), (-17, 2), (3, -5), (0, 0), (9, 16)]
MODELS = {14: "vit_small_patch14_dinov2", 16: "deit3_small_patch16_224"}


def model_and_images(patch: int, batch: int = 2, grid=(3, 5), seed: int = 0):
    model = tiny_vit(MODELS[patch], embed_dim=40, seed=seed).to(DEVICE)  # D = 40: not a multiple of the tile
    images = torch.randn(batch, 3, grid[0] * patch, grid[1] * patch, device=DEVICE)
    return model, images


def run_kernel(images, model, padding, out_dtype):
    """The kernel alone, writing into a NaN-poisoned buffer so that unwritten elements show."""
    proj = model.patch_embed.proj
    batch, _, height, width = images.shape
    patch = proj.kernel_size[0]
    out = torch.full((len(SHIFTS) * batch, height // patch, width // patch, proj.out_channels), float("nan"),
                     device=images.device, dtype=out_dtype)
    table = torch.tensor(SHIFTS, dtype=torch.int32, device=images.device)
    pe.shift_patch_embed_triton(images, table, proj.weight, proj.bias, patch, padding, out_dtype, out=out)
    return out


@pytest.mark.parametrize("patch", [14, 16])
@pytest.mark.parametrize("padding", ["zeros", "replicate", "reflect"])
def test_kernel_equals_model_patch_embed_float32(patch, padding):
    model, images = model_and_images(patch)
    with torch.no_grad():
        expected = model.patch_embed(shift_images(images, SHIFTS, padding))  # (K*B, h, w, D): dynamic_img_size
        got = run_kernel(images, model, padding, torch.float32)
    assert got.shape == expected.shape == (len(SHIFTS) * 2, 3, 5, 40)
    assert not got.isnan().any()
    assert rel_err(got, expected) <= 1e-5


@pytest.mark.parametrize("patch", [14, 16])
@pytest.mark.parametrize("padding", ["zeros", "reflect"])
@pytest.mark.parametrize("image_dtype", [torch.float32, torch.bfloat16])
def test_kernel_bfloat16_close_to_model_patch_embed(patch, padding, image_dtype):
    model, images = model_and_images(patch, grid=(2, 3), seed=1)
    with torch.no_grad():
        expected = model.patch_embed(shift_images(images, SHIFTS, padding))
        got = run_kernel(images.to(image_dtype), model, padding, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and not got.isnan().any()
    assert rel_err(got, expected) <= 1e-2


@pytest.mark.parametrize("padding", ["zeros", "replicate", "reflect"])
def test_reference_is_the_conv_on_shifted_images_in_float64(padding):
    model, images = model_and_images(14, grid=(2, 3))
    proj = model.patch_embed.proj.double()
    images = images.double()
    got, impl = pe.shift_patch_embed(images, SHIFTS, proj.weight, proj.bias, 14, padding, impl="reference")
    expected = proj(shift_images(images, SHIFTS, padding)).permute(0, 2, 3, 1)
    assert got.dtype == torch.float64 and impl == "reference"
    assert rel_err(got, expected) <= 1e-12


def test_dispatcher_fused_equals_reference_without_bias_and_on_one_tiny_image():
    torch.manual_seed(0)
    images = torch.randn(1, 3, 14, 14, device=DEVICE)  # one token: every shift reaches the border
    weight = torch.randn(24, 3, 14, 14, device=DEVICE)
    shifts = [(13, -13), (-13, 13), (0, 0)]
    for padding in ("zeros", "replicate", "reflect"):
        fused = pe.shift_patch_embed(images, shifts, weight, None, 14, padding, impl="fused")
        reference = pe.shift_patch_embed(images, shifts, weight, None, 14, padding, impl="reference")
        assert (fused.impl, reference.impl) == ("fused", "reference")
        assert rel_err(fused.embeddings, reference.embeddings) <= 1e-5


def test_auto_runs_the_kernel_on_cuda_only():
    torch.manual_seed(0)
    images, weight = torch.randn(1, 3, 28, 28, device=DEVICE), torch.randn(8, 3, 14, 14, device=DEVICE)
    expected = "fused" if DEVICE == "cuda" else "reference"
    assert pe.shift_patch_embed(images, [(1, 2)], weight, None, 14).impl == expected


def test_fused_without_a_runnable_device_warns_once_and_uses_the_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(errors, "_warned", set())
    torch.manual_seed(0)
    images, weight = torch.randn(1, 3, 28, 28), torch.randn(8, 3, 14, 14)
    with pytest.warns(UserWarning, match="need CUDA tensors.*falls back to 'reference' instead of 'fused'"):
        first = pe.shift_patch_embed(images, [(1, 2)], weight, None, 14, impl="fused")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call is silent
        second = pe.shift_patch_embed(images, [(1, 2)], weight, None, 14, impl="fused")
    assert first.impl == second.impl == "reference"
    assert torch.equal(first.embeddings, second.embeddings)


def test_a_dtype_the_kernel_does_not_write_runs_the_reference_with_one_warning(monkeypatch):
    monkeypatch.setattr(errors, "_warned", set())
    images, weight = torch.randn(1, 3, 28, 28, device=DEVICE), torch.randn(8, 3, 14, 14, device=DEVICE)
    with pytest.warns(UserWarning, match="not torch.float64: shift_patch_embed falls back to 'reference'"):
        got = pe.shift_patch_embed(images, [(1, 2)], weight, None, 14, impl="fused", out_dtype=torch.float64)
    assert got.impl == "reference" and got.embeddings.dtype == torch.float64


def test_a_patch_embedding_that_is_not_a_plain_conv_runs_the_model_module_with_one_warning(monkeypatch):
    """Asked for the kernel, a PatchEmbed with a norm runs itself on the shifted views: the kernel and
    its reference cannot, and one warning names what runs instead."""
    monkeypatch.setattr(errors, "_warned", set())
    torch.manual_seed(0)
    module = PatchEmbed(img_size=28, patch_size=14, in_chans=3, embed_dim=8, norm_layer=nn.LayerNorm,
                        strict_img_size=False).to(DEVICE)
    images = torch.randn(2, 3, 28, 42, device=DEVICE)
    with pytest.warns(UserWarning) as caught, torch.no_grad():
        got, impl = pe.embed_views(images, SHIFTS, module, "reflect", torch.float32, impl="fused")
    assert len(caught) == 1
    expected = "LayerNorm after the projection.*falls back to 'patch_embed' instead of 'fused'"
    assert re.search(expected, str(caught[0].message))
    with torch.no_grad():
        expected = module(shift_images(images, SHIFTS, "reflect")).unflatten(1, (2, 3))  # flattened (N, L, D)
    assert impl == "patch_embed" and got.shape == (len(SHIFTS) * 2, 2, 3, 8)
    assert rel_err(got, expected) <= 1e-6
    with pytest.raises(Unavailable, match="no patch_embed module"):
        pe.shift_patch_embed(images, SHIFTS[:1], module.proj.weight, None, 14, impl="patch_embed")


def test_a_plain_timm_patch_embed_module_runs_the_kernel_with_its_own_weights():
    model, images = model_and_images(14, grid=(2, 3))
    with torch.no_grad():
        got, impl = pe.embed_views(images, SHIFTS, model.patch_embed, "zeros", torch.float32, impl="fused")
        expected = model.patch_embed(shift_images(images, SHIFTS, "zeros"))
    assert impl == "fused"
    assert rel_err(got, expected) <= 1e-5


def test_kernel_launch_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    """Compiled Triton on CPU pointers would crash the process: a clear error instead."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    images, weight = torch.randn(1, 3, 28, 28), torch.randn(8, 3, 14, 14)
    table = torch.zeros(1, 2, dtype=torch.int32)
    with pytest.raises(Unavailable, match="kernel cannot run on this cpu tensor.*TRITON_INTERPRET=1"):
        pe.shift_patch_embed_triton(images, table, weight, None, 14, "zeros", torch.float32)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(weight=torch.randn(8, 3, 16, 16)), r"weight must have shape \(D, C, 14, 14\)"),
        (dict(weight=torch.randn(8, 4, 14, 14)), "4 channels"),
        (dict(bias=torch.randn(9)), r"bias must have shape \(8,\)"),
        (dict(images=torch.randn(1, 3, 30, 28)), "30x28 is not a multiple of the patch size 14"),
        (dict(images=torch.full((1, 3, 28, 28), float("nan"))), "NaN"),
        (dict(images=torch.ones(1, 3, 28, 28, dtype=torch.int64)), "floating-point"),
        (dict(shifts=[(28, 0)]), r"shift \(28, 0\)"),
        (dict(shifts=[]), "at least one"),
        (dict(padding="circular"), "padding='circular'"),
        (dict(impl="cuda"), "impl='cuda'"),
    ],
)
def test_bad_arguments_name_the_bad_value(change, message):
    args = dict(images=torch.randn(1, 3, 28, 28), shifts=[(0, 0)], weight=torch.randn(8, 3, 14, 14),
                bias=torch.randn(8), patch_size=14, padding="zeros", impl="fused")
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=message):
        pe.shift_patch_embed(**args)


def test_out_buffer_of_the_wrong_shape_is_refused():
    images, weight = torch.randn(1, 3, 28, 28, device=DEVICE), torch.randn(8, 3, 14, 14, device=DEVICE)
    table = torch.zeros(2, 2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="out must be a contiguous"):
        pe.shift_patch_embed_triton(images, table, weight, None, 14, "zeros", torch.float32,
                                    out=torch.empty(1, 2, 2, 8, device=DEVICE))


def test_plain_conv_weights_accepts_timm_patch_embed_and_names_what_is_not_plain():
    plain = PatchEmbed(img_size=28, patch_size=14, in_chans=3, embed_dim=8)
    weight, bias = pe.plain_conv_weights(plain)
    assert weight is plain.proj.weight and bias is plain.proj.bias
    normed = PatchEmbed(img_size=28, patch_size=14, in_chans=3, embed_dim=8, norm_layer=nn.LayerNorm)
    assert "LayerNorm after the projection" in pe.plain_conv_weights(normed)
    overlapping = PatchEmbed(img_size=28, patch_size=14, in_chans=3, embed_dim=8)
    overlapping.proj = nn.Conv2d(3, 8, 14, stride=7)
    assert "not a plain strided convolution" in pe.plain_conv_weights(overlapping)
    assert "not a plain timm PatchEmbed" in pe.plain_conv_weights(nn.Conv2d(3, 8, 14, stride=14))


def test_kernel_compiles_for_sm80_and_sm90_without_a_gpu():
    """The interpreter does not lower the kernel: compile it ahead of time with Triton's own LLVM
    and ptxas for sm_80 and sm_90, for float32, bfloat16 and float16 outputs with the tiles the
    launcher picks there, as a GPU run would: no register spill, tensor cores for 16-bit operands
    (scripts/check_triton_kernels.py; scripts/compile_check.sh runs it under other Tritons too)."""
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("Triton's NVIDIA backend is not installed")
    checker = Path(__file__).resolve().parents[1] / "scripts" / "check_triton_kernels.py"
    done = subprocess.run([sys.executable, str(checker), "--ops", "patch_embed"], capture_output=True, text=True,
                          timeout=600)
    if done.returncode and "ptxas" in done.stdout and "not found" in done.stdout.lower():
        pytest.skip("Triton's ptxas is not available")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "6 kernels compiled for sm_80, sm_90, no register spills" in done.stdout


def test_importing_fastsrt_does_not_import_the_kernel_module():
    """The kernels are imported when a fused path first runs, never by ``import fastsrt``."""
    code = "import sys, fastsrt, fastsrt.ops.patch_embed; print('fastsrt.ops.patch_embed.kernels' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"
