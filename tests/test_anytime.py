"""Anytime SRT: the view order a grid runs in (fastsrt.views.anytime_order), and stopping early with
max_views / budget_ms."""
import itertools
import time
import warnings

import pytest
import torch
from torch import nn
from utils import rel_err, tiny_vit

from fastsrt import SRT
from fastsrt.cli import _build_srt, build_parser
from fastsrt.views import anytime_order, grid, is_grid, paper_grid, shift_kernel, view_kernel

PATCH = 7


def conv_backbone(patch: int = PATCH, channels: int = 6, seed: int = 0) -> nn.Module:
    """A random patch embedding and tanh: tokens that depend on the image, cheap."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, channels, patch, stride=patch), nn.Tanh()).eval()


def grids(radii):
    return [(d, shifts) for d in radii for shifts in (grid(d), paper_grid(d))]


# the order


@pytest.mark.parametrize("d,shifts", grids(range(0, 6)))
@pytest.mark.parametrize("patch", [4, 8, 14, 16])
def test_order_is_the_views_identity_first(d, shifts, patch):
    order = anytime_order(shifts, patch)
    assert order[0] == (0, 0)
    assert sorted(order) == sorted(shifts)


def test_order_is_deterministic():
    from fastsrt.views import _greedy_order

    first = anytime_order(paper_grid(3), 14)
    _greedy_order.cache_clear()
    assert anytime_order(paper_grid(3), 14) == first == anytime_order(torch.tensor(paper_grid(3)), 14)
    assert anytime_order(paper_grid(3), 16) != first  # the patch size is part of the model


def overlaps(shifts, patch: int) -> torch.Tensor:
    """view_kernel by brute force: for each place (ry, rx) of a pixel within its token, the pixel reads in
    view s the token whose window of the original image starts at p * floor((r + s) / p) - s (per axis);
    sum over places of the overlap area of the two views' windows."""
    total = torch.zeros(len(shifts), len(shifts), dtype=torch.int64)
    for ry, rx in itertools.product(range(patch), repeat=2):
        starts = torch.tensor([[patch * ((ry + dy) // patch) - dy, patch * ((rx + dx) // patch) - dx]
                               for dy, dx in shifts])
        overlap = (patch - (starts[:, None] - starts[None]).abs()).clamp(min=0).prod(-1)
        total += overlap
    return total


@pytest.mark.parametrize("d,patch", [(1, 4), (2, 3), (3, 14), (4, 8)])
def test_view_kernel_is_the_expected_window_overlap(d, patch):
    shifts = paper_grid(d)
    assert torch.equal(view_kernel(shifts, patch), overlaps(shifts, patch))


def model_error(prefix, everything, kernel) -> float:
    """Squared distance between the kernel means of ``prefix`` and of ``everything`` (indices), float64."""
    kernel = kernel.double()
    k, n = len(prefix), len(everything)
    return (kernel[prefix][:, prefix].sum() / k**2 - 2 * kernel[prefix][:, everything].sum() / (k * n)
            + kernel[everything][:, everything].sum() / n**2).item()


@pytest.mark.parametrize("d,shifts", grids((1, 2, 3)))
@pytest.mark.parametrize("patch", [5, 14])
def test_each_view_is_the_greedy_best_for_the_model_then_for_the_shift_grid(d, shifts, patch):
    """After the identity, each view minimises the prefix's model error (kernel: brute-force window
    overlaps); among the equal ones, the error under shift_kernel; then the earliest in ``shifts``."""
    order = anytime_order(shifts, patch)
    kernel, shift_kernel_ = overlaps(shifts, patch), shift_kernel(shifts)
    everything, left, prefix = list(range(len(shifts))), list(range(len(shifts))), []
    for shift in order:
        chosen = next(i for i in left if shifts[i] == shift)
        if prefix:
            errors = {i: model_error(prefix + [i], everything, kernel) for i in left}
            best = min(errors.values())
            tied = [i for i in left if errors[i] <= best * (1 + 1e-12)]
            assert chosen in tied
            second = {i: model_error(prefix + [i], everything, shift_kernel_) for i in tied}
            tied = [i for i in tied if second[i] <= min(second.values()) * (1 + 1e-12)]
            assert chosen == next(i for i in tied if shifts[i] == shift) and shifts[tied[0]] == shift
        prefix.append(chosen)
        left.remove(chosen)


@pytest.mark.parametrize("d,shifts", grids((1, 2, 3, 4, 5)))
@pytest.mark.parametrize("patch", [14, 16])
def test_prefixes_cover_evenly(d, shifts, patch):
    """With shifts smaller than half a patch (every setting of the paper): the model error of every
    prefix is at most the raster order's, and below it from 3 views on; the prefix's shifts sum to
    at most d + 1 in absolute value on each axis (raster's reach d (2d + 1) (d + 1) / 2 and more)."""
    order = anytime_order(shifts, patch)
    kernel = view_kernel(shifts, patch)
    index = {shift: [i for i, s in enumerate(shifts) if s == shift] for shift in shifts}
    taken = {shift: 0 for shift in shifts}
    order_indices = []
    for shift in order:
        order_indices.append(index[shift][taken[shift]])
        taken[shift] += 1
    everything = list(range(len(shifts)))
    for k in range(1, len(shifts)):
        anytime, raster = (model_error(prefix[:k], everything, kernel) for prefix in (order_indices, everything))
        assert anytime <= raster * (1 + 1e-12), k
        if k >= 3:
            assert anytime < raster, k
        sums = torch.tensor(order[:k]).sum(0).abs()
        assert (sums <= d + 1).all(), (k, sums)


def test_only_grids_are_reordered():
    model = conv_backbone()
    assert SRT(model, 3, patch_size=PATCH).shifts == anytime_order(paper_grid(3), PATCH)
    assert SRT(model, paper_grid(2), patch_size=PATCH).shifts == anytime_order(paper_grid(2), PATCH)
    assert SRT(model, grid(2), patch_size=PATCH).shifts == anytime_order(grid(2), PATCH)
    for explicit in ([(1, 0), (0, 0)], grid(1)[::-1], paper_grid(1)[1:] + [(0, 0)], anytime_order(grid(2), PATCH)[:7]):
        assert not is_grid(explicit)
        assert SRT(model, explicit, patch_size=PATCH).shifts == explicit


# the full result is unchanged


SETTINGS = [("mean", False, "pixel"), ("median", True, "pixel"), ("mean", True, "token")]


# the fused median of 50 views takes minutes in Triton's interpreter; the median does not depend on the order
@pytest.mark.parametrize("impl,reduce,ignore_padding,output",
                         [(impl, *setting) for impl in ("reference", "chunked", "fused") for setting in SETTINGS
                          if (impl, setting[0]) != ("fused", "median")])
def test_the_full_result_is_the_raster_orders(impl, reduce, ignore_padding, output):
    """All 50 views in the anytime order against the paper's raster order (given with the second identity
    last, so that it keeps its order): the same up to float32 rounding of the sums; the median per
    element. The std too. The fused aggregation runs in Triton's interpreter here: a smaller image."""
    images = torch.randn(1, 3, 14, 21) if impl == "fused" else torch.randn(2, 3, 28, 35)
    options = dict(patch_size=PATCH, reduce=reduce, ignore_padding=ignore_padding, output=output, impl=impl)
    raster = paper_grid(3)[1:] + [(0, 0)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # impl="fused" on a CPU: the views fall back to the reference path
        anytime = SRT(conv_backbone(), 3, **options).run(images, std=True)
        expected = SRT(conv_backbone(), raster, **options).run(images, std=True)
    assert anytime.views_done == 50 and expected.views_done == 50
    if reduce == "median":
        torch.testing.assert_close(anytime.features, expected.features, rtol=1e-6, atol=1e-6)
    else:
        assert rel_err(anytime.features, expected.features) <= 1e-5
    assert rel_err(anytime.std, expected.std) <= 1e-5


# stopping early


@pytest.mark.parametrize("reduce,ignore_padding,output", [("mean", False, "pixel"), ("median", True, "pixel"),
                                                           ("median", False, "token"), ("mean", True, "pixel")])
@pytest.mark.parametrize("k", [1, 2, 7, 23])
def test_max_views_is_srt_on_the_first_views_of_the_order(k, reduce, ignore_padding, output):
    images = torch.randn(2, 3, 28, 35)
    options = dict(patch_size=PATCH, reduce=reduce, ignore_padding=ignore_padding, output=output, view_batch=6)
    early = SRT(conv_backbone(), 3, max_views=k, **options)
    out = early.run(images, std=True)
    expected = SRT(conv_backbone(), early.shifts[:k], **options).run(images, std=True)
    assert out.views_done == k and expected.views_done == k
    torch.testing.assert_close(out.features, expected.features, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.std, expected.std, rtol=1e-6, atol=1e-6)
    full = SRT(conv_backbone(), 3, **options).run(images)
    assert rel_err(out.features, full.features) > 1e-3  # the early result is not the full one


def test_max_views_of_all_views_or_more_is_the_full_result_and_prefix_tokens_follow():
    model = tiny_vit(depth=1)
    images = torch.randn(1, 3, 28, 28)
    full = SRT(model, 1).run(images, std=True, prefix=True)
    for k in (10, 11, 1000):
        out = SRT(model, 1, max_views=k).run(images, std=True, prefix=True)
        assert out.views_done == 10
        for got, expected in ((out.features, full.features), (out.std, full.std), (out.prefix, full.prefix)):
            assert torch.equal(got, expected)
    early = SRT(model, 1, max_views=4)
    out = early.run(images, prefix=True)
    expected = SRT(model, early.shifts[:4]).run(images, prefix=True)
    assert out.views_done == 4
    torch.testing.assert_close(out.prefix, expected.prefix, rtol=1e-6, atol=1e-6)
    assert rel_err(out.features, full.features) > 1e-3


@pytest.mark.parametrize("budget_ms", [0, 1e-6])
def test_a_spent_budget_still_runs_one_chunk(budget_ms):
    images = torch.randn(2, 3, 28, 28)
    srt = SRT(conv_backbone(), 3, patch_size=PATCH, view_batch=6, budget_ms=budget_ms)  # 3 views per chunk
    out = srt.run(images, std=True)
    assert out.views_done == 3
    expected = SRT(conv_backbone(), srt.shifts[:3], patch_size=PATCH).run(images, std=True)
    torch.testing.assert_close(out.features, expected.features, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.std, expected.std, rtol=1e-6, atol=1e-6)
    assert SRT(conv_backbone(), 3, patch_size=PATCH, view_batch=6, budget_ms=1e9).run(images).views_done == 50


def test_the_budget_stops_before_a_chunk_that_would_not_fit():
    """Each backbone call takes at least 20 ms; with a 50 ms budget and one view per call, a third call
    (at >= 40 ms spent, >= 20 ms a view) would not fit: one or two views, however slow the machine."""
    embed = conv_backbone()

    def slow(images):
        time.sleep(0.02)
        return embed(images)

    srt = SRT(slow, 3, patch_size=PATCH, view_batch=1, budget_ms=50)
    start = time.perf_counter()
    out = srt.run(torch.randn(1, 3, 28, 28))
    assert out.views_done in (1, 2)
    assert time.perf_counter() - start < 1.0
    assert SRT(slow, 1, patch_size=PATCH, view_batch=10).run(torch.randn(1, 3, 28, 28)).views_done == 10


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_views=0), "max_views must be None or an int >= 1, got 0"),
    (dict(max_views=-3), "got -3"),
    (dict(max_views=2.5), "got 2.5"),
    (dict(max_views=True), "got True"),
    (dict(max_views="3"), "got '3'"),
    (dict(budget_ms=-1), "budget_ms must be None or a finite number of milliseconds >= 0, got -1"),
    (dict(budget_ms=float("nan")), "got nan"),
    (dict(budget_ms=float("inf")), "got inf"),
    (dict(budget_ms=True), "got True"),
    (dict(budget_ms="10"), "got '10'"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SRT(conv_backbone(), 1, patch_size=PATCH, **kwargs)


def test_anytime_order_bad_patch():
    with pytest.raises(ValueError, match="patch_size must be an int >= 1, got 0"):
        anytime_order(grid(1), 0)


def test_command_line_options_reach_srt():
    parser = build_parser()
    args = parser.parse_args(["extract", "x", "--out", "o", "--model", "vit_small_patch14_dinov2",
                              "--pretrained", "no", "--max-views", "7", "--budget-ms", "12.5", "--device", "cpu"])
    srt = _build_srt(args)
    assert (srt.max_views, srt.budget_ms) == (7, 12.5)
    defaults = parser.parse_args(["demo"])
    assert (defaults.max_views, defaults.budget_ms) == (None, None)
