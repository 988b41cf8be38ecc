"""Properties of SRT over drawn inputs (hypothesis): random image sizes (non-square, not patch
multiples with pad_to_patch), random shift lists (duplicates, negative, up to the largest the
image allows: |dy| < H, |dx| < W) and every option combination.

- the fast aggregations ("chunked", and "fused" under the Triton interpreter) equal the reference,
  with the float32 tolerances of tests/test_warp_aggregate.py;
- the standard deviation across views is >= 0 everywhere (and so never NaN);
- K identical shifts give the one-view result: the median exactly, the mean and std within K ulps;
- the mean is linear in the backbone's tokens.

Most properties use a random strided convolution as the backbone (a linear patch embedding, far
cheaper than a ViT); one runs a tiny timm ViT through the fused views. The examples are few,
small and derandomised, so the file is deterministic and fast enough for CI on a CPU.
"""
from typing import NamedTuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from utils import rel_err, tiny_vit

import fastsrt
from fastsrt.ops.warp_aggregate import chunked, fused, warp_aggregate
from fastsrt.options import OUTPUTS, PADDINGS, REDUCES, UPSAMPLES

IMPLS = ("reference", "chunked", "fused")
FLOAT32_EPS = torch.finfo(torch.float32).eps
CHANNELS = 4


def bounded(examples: int):
    """``examples`` drawn cases, the same ones on every run (no example database)."""
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None)


@pytest.fixture(autouse=True, scope="module")
def triton_interpreter():
    """Every case here is on the CPU, so the fused paths run in Triton's interpreter, also on a
    machine with a GPU (where tests/conftest.py leaves it off; fastsrt.ops._triton re-imports the
    kernels when the mode changes). The GPU's own fused parity: tests/test_warp_aggregate.py."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        yield


@pytest.fixture(autouse=True, scope="module")
def poisoned_outputs():
    """The fast paths' output buffers start as NaN, so an element they do not write shows."""
    def poisoned(shape, tokens):
        return torch.full(shape, float("nan"), dtype=tokens.dtype, device=tokens.device)

    with pytest.MonkeyPatch.context() as patch:
        for module in (chunked, fused):
            patch.setattr(module, "empty_output", poisoned)
        yield


def patch_embedding(patch: int, seed: int) -> nn.Conv2d:
    """A random linear patch embedding: a convolution with kernel = stride = patch, 3 -> CHANNELS."""
    conv = nn.Conv2d(3, CHANNELS, patch, stride=patch)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) / patch)
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator))
    return conv.eval()


EMBEDDINGS = {(patch, seed): patch_embedding(patch, seed) for patch in (4, 7) for seed in (0, 1)}


class Case(NamedTuple):
    images: torch.Tensor  # (B, 3, H, W)
    shifts: list[tuple[int, int]]
    patch: int
    pad_to_patch: bool


def axis_shifts(size: int):
    """Shifts along an axis of ``size`` pixels: any allowed one, the two largest often."""
    return st.one_of(st.integers(-(size - 1), size - 1), st.sampled_from([-(size - 1), size - 1]))


@st.composite
def cases(draw, patches=(4, 7), max_tokens=5, max_views=10, max_batch=2) -> Case:
    """Images of a random size, and a shift list: distinct shifts and repeats of some of them, shuffled."""
    patch = draw(st.sampled_from(patches))
    pad_to_patch = draw(st.booleans())
    if pad_to_patch:  # any size from one patch up
        height, width = (draw(st.integers(patch, max_tokens * patch)) for _ in range(2))
    else:
        height, width = (patch * draw(st.integers(1, max_tokens)) for _ in range(2))
    distinct = draw(st.lists(st.tuples(axis_shifts(height), axis_shifts(width)), min_size=1, max_size=max_views,
                             unique=True))
    repeats = draw(st.lists(st.sampled_from(distinct), max_size=max_views - len(distinct)))
    shifts = draw(st.permutations(distinct + repeats))
    batch, seed = draw(st.integers(1, max_batch)), draw(st.integers(0, 2**16))
    images = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))
    return Case(images, shifts, patch, pad_to_patch)


options = st.fixed_dictionaries(dict(
    upsample=st.sampled_from(UPSAMPLES),
    padding=st.sampled_from(PADDINGS),
    reduce=st.sampled_from(REDUCES),
    ignore_padding=st.booleans(),
    output=st.sampled_from(OUTPUTS),
))


def srt(case: Case, impl: str, backbone=None, **kwargs) -> fastsrt.SRT:
    backbone = EMBEDDINGS[case.patch, 0] if backbone is None else backbone
    return fastsrt.SRT(backbone, case.shifts, patch_size=case.patch, pad_to_patch=case.pad_to_patch, impl=impl,
                       **kwargs)


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, exact_elements: bool = False) -> None:
    """tests/test_warp_aggregate.py's float32 parity: relative error <= 1e-5, or (median) each
    element equal to the reference's up to float rounding of the sampled values."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.isfinite(actual).all(), "unwritten (NaN-poisoned) or non-finite elements"
    if exact_elements or expected.norm() == 0:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    else:
        assert rel_err(actual, expected) <= 1e-5


def token_scale(model: fastsrt.SRT, images: torch.Tensor) -> float:
    """The largest magnitude of the views' tokens that ``model`` aggregates."""
    return model.view_tokens(model.backbone.prepare(images)).tokens[0].abs().max().item()


def assert_same_run(actual: fastsrt.SRTOutput, expected: fastsrt.SRTOutput, reference: fastsrt.SRT,
                    images: torch.Tensor, reduce: str, std: bool, exact_median: bool = True) -> None:
    """The features (and std, which must be >= 0 in both) of two SRT runs agree. Where views are
    equal (duplicate shifts), the std is 0 up to the rounding of the mean, ~K ulps of the tokens,
    which each path rounds its own way: such a std is compared within that rounding, not relatively."""
    assert_matches(actual.features, expected.features, exact_elements=exact_median and reduce == "median")
    if not std:
        assert actual.std is None and expected.std is None
        return
    assert_std_matches(actual.std, expected.std, len(reference.shifts), token_scale(reference, images))


def assert_std_matches(actual: torch.Tensor, expected: torch.Tensor, views: int, scale: float) -> None:
    """Both >= 0; relative error <= 1e-5, or every element within the rounding of a mean of
    ``views`` values of magnitude <= ``scale`` (a std of equal values is that rounding)."""
    assert (actual >= 0).all() and (expected >= 0).all()
    assert actual.shape == expected.shape and torch.isfinite(actual).all()
    rounding = (views + 2) * FLOAT32_EPS * scale
    assert rel_err(actual, expected) <= 1e-5 or (actual - expected).abs().max() <= rounding


# ---- the fast paths equal the reference ----------------------------------------------------------


@bounded(200)
@given(case=cases(), options=options, std=st.booleans(), view_batch=st.integers(1, 8),
       chunk_elements=st.sampled_from([chunked.CHUNK_ELEMENTS, 600]))
def test_chunked_srt_equals_reference(case, options, std, view_batch, chunk_elements):
    """The chunked aggregation inside SRT, also with tiny chunks (many chunks of channels and rows,
    uneven last ones)."""
    reference = srt(case, "reference", view_batch=view_batch, **options)
    expected = reference.run(case.images, std=std)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(chunked, "CHUNK_ELEMENTS", chunk_elements)
        actual = srt(case, "chunked", view_batch=view_batch, **options).run(case.images, std=std)
    assert actual.aggregation_impl == "chunked"
    assert_same_run(actual, expected, reference, case.images, options["reduce"], std)


@pytest.mark.filterwarnings("ignore:a CallableBackbone is not a timm ViT")  # the views run the reference path
@bounded(40)
@given(case=cases(max_tokens=4, max_views=8), options=options, std=st.booleans())
def test_fused_srt_equals_reference(case, options, std):
    """The fused aggregation (Triton interpreter on the CPU) inside SRT."""
    reference = srt(case, "reference", **options)
    expected = reference.run(case.images, std=std)
    actual = srt(case, "fused", **options).run(case.images, std=std)
    assert actual.aggregation_impl == "fused"
    assert_same_run(actual, expected, reference, case.images, options["reduce"], std)


@bounded(50)
@given(data=st.data(), patch=st.integers(1, 7), h=st.integers(1, 4), w=st.integers(1, 4), views=st.integers(1, 16),
       options=options, std=st.booleans(), seed=st.integers(0, 2**16))
def test_fused_op_equals_reference_on_random_token_grids(data, patch, h, w, views, options, std, seed):
    """warp_aggregate itself on random token grids (K, B, C, h, w), any patch size from 1: cheaper
    than a whole SRT, so more shapes. Up to 16 views (the median's rank selection; its sort for
    more views is slow in the interpreter: tests/test_warp_aggregate.py runs it with 50 and 128)."""
    del options["padding"]  # a property of the views, not of the aggregation
    shifts = data.draw(st.lists(st.tuples(axis_shifts(patch * h), axis_shifts(patch * w)), min_size=views,
                                max_size=views))
    tokens = torch.randn(views, 2, 3, h, w, generator=torch.Generator().manual_seed(seed))
    settings_ = (options["upsample"], options["reduce"], options["ignore_padding"], options["output"], std)
    expected = warp_aggregate(tokens, shifts, patch, *settings_, impl="reference")
    actual = warp_aggregate(tokens, shifts, patch, *settings_, impl="fused")
    assert actual.impl == "fused"
    assert_matches(actual.result, expected.result, exact_elements=options["reduce"] == "median")
    if std:
        assert_std_matches(actual.std, expected.std, views, tokens.abs().max().item())


@bounded(10)
@given(case=cases(patches=(7,), max_tokens=4, max_views=5, max_batch=1), options=options, std=st.booleans())
def test_tiny_vit_fused_srt_equals_reference(case, options, std):
    """A timm ViT through the fused views (the patch-embedding kernel) and the fused aggregation.
    Patch 7 and 8 channels: in the interpreter the per-pixel kernel's token output loops over the
    p x p pixels of a token, per block of channels (patch 14 would cost 4 times as much). The
    kernel's embedding rounds differently from the model's convolution, so even a median is
    compared as a whole, as in tests/test_warp_aggregate.py."""
    model = tiny_vit(embed_dim=8, patch_size=7)
    reference = srt(case, "reference", backbone=model, **options)
    expected = reference.run(case.images, std=std)
    actual = srt(case, "fused", backbone=model, **options).run(case.images, std=std)
    assert (actual.views_impl, actual.aggregation_impl) == ("fused", "fused")
    assert_same_run(actual, expected, reference, case.images, options["reduce"], std, exact_median=False)


# ---- std >= 0 ----------------------------------------------------------------------------------


@bounded(200)
@given(shifts=st.lists(st.tuples(st.integers(-3, 3), st.integers(-3, 3)), min_size=1, max_size=12), options=options,
       offset=st.sampled_from([0.0, 1.0, -3e4]), scale=st.sampled_from([0.0, 1e-30, 1e-6, 1.0, 1e15]),
       impl=st.sampled_from(IMPLS), seed=st.integers(0, 2**16))
def test_std_is_never_negative(shifts, options, offset, scale, impl, seed):
    """Token grids of every scale around an offset (equal values, values that differ in their last
    bits, huge ones): the std is >= 0 at every pixel, so neither negative nor NaN. Shifts of at most
    one patch, so that most pixels see every view: there the values are equal or nearly so, where a
    one-pass variance (E[x^2] - E[x]^2) would come out negative."""
    del options["padding"]
    tokens = offset + scale * torch.randn(len(shifts), 1, 2, 3, 4, generator=torch.Generator().manual_seed(seed))
    out = warp_aggregate(tokens, shifts, 3, options["upsample"], options["reduce"], options["ignore_padding"],
                         options["output"], return_std=True, impl=impl)
    assert out.impl == impl
    assert (out.std >= 0).all(), out.std.min()


# ---- K identical shifts ------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:a CallableBackbone is not a timm ViT")
@bounded(80)
@given(case=cases(max_tokens=4, max_views=1), copies=st.integers(2, 9), options=options, std=st.booleans(),
       impl=st.sampled_from(IMPLS))
def test_identical_shifts_give_the_one_view_result(case, copies, options, std, impl):
    """SRT with K copies of one shift equals SRT with that shift alone. view_batch = the batch, so
    that each backbone call sees the single run's images and the K token grids are bit-identical
    copies of its grid. The median of K equal values is that value: exact. The mean is not bit-exact:
    K equal float32 terms summed, then divided by K, round ((0.9f + 0.9f + 0.9f) / 3 is 1 ulp below
    0.9f; for K = 3 to 9 that happens to 12-50% of random values), and so does a bilinear upsampling
    of the sum. Its error is within K rounding units of the largest token, and so is the std's (0
    for one view, about |mean - value| for K copies)."""
    one = srt(case, impl, view_batch=len(case.images), **options)
    many = srt(case._replace(shifts=case.shifts * copies), impl, view_batch=len(case.images), **options)
    expected, actual = one.run(case.images, std=std), many.run(case.images, std=std)
    tokens = one.view_tokens(one.backbone.prepare(case.images)).tokens[0]  # (1, B, C, h, w)
    assert torch.equal(many.view_tokens(many.backbone.prepare(case.images)).tokens[0], tokens.expand(copies, *[-1] * 4))
    tolerance = copies * FLOAT32_EPS * tokens.abs().max().item()
    if options["reduce"] == "median":
        assert torch.equal(actual.features, expected.features)
    else:
        torch.testing.assert_close(actual.features, expected.features, rtol=0, atol=tolerance)
    if std:
        assert (actual.std >= 0).all()
        torch.testing.assert_close(actual.std, expected.std, rtol=0, atol=tolerance)


# ---- the mean is linear in the tokens ----------------------------------------------------------


@pytest.mark.filterwarnings("ignore:a CallableBackbone is not a timm ViT")
@bounded(60)
@given(case=cases(max_tokens=4, max_views=8), options=options, impl=st.sampled_from(IMPLS),
       a=st.floats(-2, 2, width=32), b=st.floats(-2, 2, width=32))
def test_mean_is_linear_in_the_tokens(case, options, impl, a, b):
    """SRT(a f + b g) = a SRT(f) + b SRT(g) for two random linear patch embeddings f and g (with
    biases), whatever the padding, upsampling, frame handling and output: up to float32 rounding,
    1e-5 of the terms' size."""
    options["reduce"] = "mean"
    f, g = EMBEDDINGS[case.patch, 0], EMBEDDINGS[case.patch, 1]
    combined = srt(case, impl, backbone=lambda views: a * f(views) + b * g(views), **options)(case.images)
    srt_f, srt_g = (srt(case, impl, backbone=embedding, **options)(case.images) for embedding in (f, g))
    expected = a * srt_f + b * srt_g
    assert torch.isfinite(combined).all()
    assert (combined - expected).norm() <= 1e-5 * (abs(a) * srt_f.norm() + abs(b) * srt_g.norm())
