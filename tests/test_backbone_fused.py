"""The fused view path: the rest of the ViT from patch embeddings (timm's own modules), the fused
views against Backbone on shifted images, and SRT(impl="fused") against impl="reference"."""
import warnings

import pytest
import torch
from torch import nn
from utils import rel_err, requires_cuda, tiny_vit

import fastsrt
from fastsrt import errors
from fastsrt.backbone import Backbone, CallableBackbone
from fastsrt.backbone_fused import (
    DEFAULT_VIEW_BATCH,
    FusedViews,
    auto_view_batch,
    fused_views_unsupported,
)
from fastsrt.ops.shift import shift_images

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHIFTS = [(0, 0), (2, -3), (2, -3), (-15, 1)]
# (timm name, extra kwargs): class + registers, a fixed-size (N, L, C) model, Eva with rotary embeddings
MODELS = {
    "dinov2": ("vit_small_patch14_dinov2", {}),
    "reg4": ("vit_small_patch14_reg4_dinov2", {}),
    "fixed_size": ("deit3_small_patch16_224", dict(img_size=(48, 32), dynamic_img_size=False)),
    "eva": ("eva02_tiny_patch14_224", dict(img_size=42)),
}


def backbone_and_images(key: str, batch: int = 2):
    name, kwargs = MODELS[key]
    backbone = Backbone(tiny_vit(name, **kwargs)).to(DEVICE)
    patch = backbone.patch_size
    size = (48, 32) if key == "fixed_size" else (2 * patch, 3 * patch)
    torch.manual_seed(1)
    return backbone, torch.randn(batch, 3, *size, device=DEVICE)


def assert_outputs_close(got, expected, tolerance):
    assert len(got.tokens) == len(expected.tokens)
    for a, b in zip(got.tokens, expected.tokens):
        assert a.shape == b.shape and rel_err(a, b) <= tolerance
    for a, b in zip(got.prefix, expected.prefix):
        assert a.shape == b.shape
        if b.numel():
            assert rel_err(a, b) <= tolerance


@pytest.mark.parametrize("key", list(MODELS))
def test_forward_embeddings_equals_backbone_forward(key):
    backbone, images = backbone_and_images(key)
    views = shift_images(images, SHIFTS, "reflect")
    grid = (views.shape[-2] // backbone.patch_size, views.shape[-1] // backbone.patch_size)
    with torch.no_grad():
        expected = backbone(views, [-1, 0], return_prefix=True)
        embeddings = backbone.model.patch_embed(views)
        got = FusedViews(backbone).forward_embeddings(embeddings, grid, [-1, 0], return_prefix=True)
    assert_outputs_close(got, expected, 1e-6)


@pytest.mark.parametrize("key", list(MODELS))
@pytest.mark.parametrize("padding", ["zeros", "replicate"])
def test_fused_views_equal_backbone_on_shifted_images(key, padding):
    backbone, images = backbone_and_images(key)
    with torch.no_grad():
        expected = backbone(shift_images(images, SHIFTS, padding), [0, -1, 0], return_prefix=True)
        got = FusedViews(backbone)(images, SHIFTS, padding, [0, -1, 0], return_prefix=True)
    assert got.embedding_impl == "fused"  # the kernel: on CUDA, or here under TRITON_INTERPRET=1
    assert_outputs_close(got, expected, 1e-5)


def test_non_plain_patch_embedding_falls_back_to_the_model_with_one_notice(monkeypatch):
    monkeypatch.setattr(errors, "_warned", set())
    backbone, images = backbone_and_images("dinov2")
    backbone.model.patch_embed.norm = nn.LayerNorm(backbone.embed_dim)
    fused = FusedViews(backbone)
    with torch.no_grad():
        with pytest.warns(UserWarning, match="LayerNorm after the projection.*falls back to 'patch_embed'"):
            first = fused(images, SHIFTS, "zeros", -1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = fused(images, SHIFTS, "zeros", -1)
        expected = backbone(shift_images(images, SHIFTS, "zeros"), -1)
    assert first.embedding_impl == got.embedding_impl == "patch_embed"
    assert rel_err(got.tokens[0], expected.tokens[0]) <= 1e-6


def test_backbones_without_a_vit_are_refused_by_name():
    callable_backbone = CallableBackbone(lambda x: x[:, :, ::14, ::14], patch_size=14)
    assert "CallableBackbone is not a timm ViT" in fused_views_unsupported(callable_backbone)
    with pytest.raises(TypeError, match="cannot run this backbone"):
        FusedViews(callable_backbone)
    with pytest.raises(ValueError, match="dtype=torch.int8"):
        FusedViews(backbone_and_images("dinov2")[0], dtype=torch.int8)


@pytest.mark.parametrize("reduce", ["mean", "median"])
def test_srt_fused_equals_reference(reduce):
    model = tiny_vit("vit_small_patch14_reg4_dinov2").to(DEVICE)
    torch.manual_seed(2)
    images = torch.randn(2, 3, 30, 44, device=DEVICE)  # odd sizes, padded to 42 x 56
    common = dict(shifts=[(0, 0), (1, -2), (-3, 3), (1, -2), (16, 0)], layer=[-1, 0], reduce=reduce,
                  pad_to_patch=True, padding="reflect")
    reference = fastsrt.SRT(model, impl="reference", **common).run(images, std=True, prefix=True)
    srt = fastsrt.SRT(model, impl="fused", view_batch=4, **common)  # two views per call: three calls
    fused = srt.run(images, std=True, prefix=True)
    assert fused.impl == "fused" and reference.impl == "reference"
    for name in ("features", "std", "prefix"):
        for got, expected in zip(getattr(fused, name), getattr(reference, name)):
            assert got.shape == expected.shape
            assert rel_err(got, expected) <= 1e-5, name


def test_srt_bfloat16_fused_close_to_bfloat16_reference_and_float32():
    model = tiny_vit("vit_small_patch14_dinov2").to(DEVICE)
    torch.manual_seed(3)
    images = torch.randn(1, 3, 28, 42, device=DEVICE)
    exact = fastsrt.SRT(model, shifts=1, impl="reference")(images)
    reference = fastsrt.SRT(model, shifts=1, impl="reference", dtype=torch.bfloat16)(images)
    out = fastsrt.SRT(model, shifts=1, impl="fused", dtype=torch.bfloat16).run(images)
    fused = out.features
    assert out.views_impl == "fused"  # the kernel wrote the bfloat16 embeddings
    assert rel_err(fused, reference) <= 1e-2
    assert rel_err(fused, exact) <= 1e-2


def test_srt_fused_on_a_callable_backbone_warns_once_and_runs_the_reference(monkeypatch):
    monkeypatch.setattr(errors, "_warned", set())
    srt = fastsrt.SRT(lambda x: x[:, :, ::14, ::14] * 2, patch_size=14, shifts=1, impl="fused")
    images = torch.randn(1, 3, 28, 28)
    with pytest.warns(UserWarning, match="CallableBackbone is not a timm ViT"):
        out = srt.run(images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = srt.run(images)
    assert out.views_impl == again.views_impl == "reference"


def test_srt_fused_in_float64_runs_the_reference_views_and_says_so(monkeypatch):
    monkeypatch.setattr(errors, "_warned", set())
    model = tiny_vit("vit_small_patch14_dinov2").to(DEVICE).double()
    images = torch.randn(1, 3, 28, 42, device=DEVICE, dtype=torch.float64)
    srt = fastsrt.SRT(model, shifts=1, impl="fused")
    with pytest.warns(UserWarning, match="not torch.float64: SRT views falls back to 'reference'"):
        out = srt.run(images)
    assert out.views_impl == "reference" and out.features.dtype == torch.float64
    assert rel_err(out.features, fastsrt.SRT(model, shifts=1, impl="reference")(images)) <= 1e-12


def test_fused_views_in_float64_run_the_torch_embedding_and_say_so(monkeypatch):
    monkeypatch.setattr(errors, "_warned", set())
    backbone, images = backbone_and_images("dinov2")
    backbone, images = backbone.double(), images.double()
    with torch.no_grad(), pytest.warns(UserWarning, match="not torch.float64"):
        got = FusedViews(backbone)(images, SHIFTS, "replicate", -1)
    expected = backbone(shift_images(images, SHIFTS, "replicate"), -1)
    assert got.embedding_impl == "reference"
    assert rel_err(got.tokens[0], expected.tokens[0]) <= 1e-12


def test_srt_auto_picks_fused_on_cuda_only_and_new_options_are_checked():
    model = tiny_vit("vit_small_patch14_dinov2")
    srt = fastsrt.SRT(model, shifts=1)
    assert srt.run(torch.randn(1, 3, 28, 28)).impl == "reference views + chunked aggregation"  # a CPU tensor
    with pytest.raises(ValueError, match="dtype=torch.float64"):
        fastsrt.SRT(model, dtype=torch.float64)
    for bad in (0, "many", 2.0, True):
        with pytest.raises(ValueError, match="view_batch must be"):
            fastsrt.SRT(model, view_batch=bad)


def test_auto_view_batch_is_the_fixed_default_on_cpu():
    views = auto_view_batch(lambda n: None, views=50, batch=2, kept_bytes_per_image=1, device=torch.device("cpu"))
    assert views == DEFAULT_VIEW_BATCH


def test_compiled_fused_views_equal_backbone():
    backbone, images = backbone_and_images("dinov2", batch=1)
    with torch.no_grad():
        expected = backbone(shift_images(images, SHIFTS[:2], "zeros"), -1)
        got = FusedViews(backbone, compile=True)(images, SHIFTS[:2], "zeros", -1)
    assert rel_err(got.tokens[0], expected.tokens[0]) <= 1e-5


@requires_cuda
def test_cuda_graph_replays_equal_eager_for_new_images_and_auto_view_batch_fits():
    backbone, images = backbone_and_images("reg4")
    fused = FusedViews(backbone, cuda_graph=True)
    with torch.no_grad():
        for seed in range(3):  # the first call captures, the next ones replay with new images
            torch.manual_seed(seed)
            images = torch.randn_like(images)
            got = fused(images, SHIFTS, "zeros", [-1, 0], return_prefix=True)
            expected = backbone(shift_images(images, SHIFTS, "zeros"), [-1, 0], return_prefix=True)
            assert got.embedding_impl == "fused"
            assert_outputs_close(got, expected, 1e-5)
        views = auto_view_batch(lambda n: fused.eager(images, SHIFTS[:n], "zeros", (1,), False), len(SHIFTS), 2,
                                1024, images.device)
    assert 2 <= views <= len(SHIFTS) * 2


@requires_cuda
def test_srt_fused_bfloat16_with_cuda_graph_close_to_reference_on_cuda():
    model = tiny_vit("vit_small_patch14_dinov2").cuda()
    images = torch.randn(2, 3, 42, 56, device="cuda")
    reference = fastsrt.SRT(model, shifts=1, impl="reference")(images)
    srt = fastsrt.SRT(model, shifts=1, dtype=torch.bfloat16, cuda_graph=True)
    for _ in range(2):  # captures, then replays
        out = srt.run(images)
        assert rel_err(out.features, reference) <= 1e-2
        assert out.impl == "fused"
