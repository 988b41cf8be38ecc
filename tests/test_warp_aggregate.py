"""warp_aggregate: the fused Triton kernels (CUDA tensors on a GPU machine, TRITON_INTERPRET=1 on
CPU tensors without one) and the chunked torch path against the reference, on random tokens with
NaN-poisoned outputs; the dispatcher and its fallbacks; SRT through the public API."""
import itertools
import os
import subprocess
import sys
import textwrap
import warnings
import weakref
from pathlib import Path

import pytest
import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from utils import rel_err, requires_cuda, tiny_vit

import fastsrt
from fastsrt import errors
from fastsrt.dispatch import names
from fastsrt.ops import _triton
from fastsrt.ops.warp_aggregate import (
    IMPLS,
    OUTPUTS,
    REDUCES,
    UPSAMPLES,
    chunked,
    dispatch,
    fused,
    reference,
    warp_aggregate,
    warp_aggregate_chunked,
    warp_aggregate_fused,
    warp_aggregate_reference,
)

KERNELS = "fastsrt.ops.warp_aggregate.kernels"

PATCH = 3  # odd and not a power of two, like 14
# where the fused kernels run compiled: conftest.py sets TRITON_INTERPRET=1 only without a GPU, so a
# GPU machine runs them on CUDA tensors
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EVERY_MODE = list(itertools.product(REDUCES, UPSAMPLES, [False, True], OUTPUTS))


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """The fast paths' output buffers start as NaN, so an element they do not write shows."""
    def poisoned(shape, tokens):
        return torch.full(shape, float("nan"), dtype=tokens.dtype, device=tokens.device)

    for module in (chunked, fused):
        monkeypatch.setattr(module, "empty_output", poisoned)


def make_case(views, dtype=torch.float32, batch=2, channels=3, h=5, w=7, seed=0, device=DEVICE):
    """Random tokens (K, B, C, h, w) and K shifts: one larger than a patch first, the identity
    twice (duplicates, as in the paper), one beyond two patches, then random ones in [-5, 5]."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(views, batch, channels, h, w, generator=generator, dtype=torch.float64).to(dtype)
    drawn = [(int(dy), int(dx)) for dy, dx in torch.randint(-5, 6, (views, 2), generator=generator)]
    shifts = ([(2, -4), (0, 0), (0, 0), (7, -8)] + drawn)[:views]
    return tokens.to(device), shifts


def assert_matches(actual, expected, exact_elements=False):
    """float32: relative error <= 1e-5, or (median) each element equal to the reference's up to
    float rounding of the sampled values; float16/bfloat16: relative error <= 1e-2."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.isfinite(actual).all(), "unwritten (NaN-poisoned) or non-finite elements"
    if expected.dtype in (torch.float16, torch.bfloat16):
        assert rel_err(actual, expected) <= 1e-2
    elif exact_elements or expected.norm() == 0:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    else:
        assert rel_err(actual, expected) <= (1e-12 if expected.dtype == torch.float64 else 1e-5)


def check_against_reference(implementation, tokens, shifts, reduce, upsample, ignore_padding, output, return_std,
                            patch=PATCH):
    settings = (upsample, reduce, ignore_padding, output, return_std)
    expected, expected_std = warp_aggregate_reference(tokens, shifts, patch, *settings)
    actual, actual_std = implementation(tokens, shifts, patch, *settings)
    assert_matches(actual, expected, exact_elements=reduce == "median")
    if return_std:
        assert_matches(actual_std, expected_std)
    else:
        assert actual_std is None


# ---- fused Triton kernels -----------------------------------------------------------------


@pytest.mark.parametrize("return_std", [False, True])
@pytest.mark.parametrize("reduce,upsample,ignore_padding,output", EVERY_MODE)
def test_fused_matches_reference(reduce, upsample, ignore_padding, output, return_std):
    tokens, shifts = make_case(9)  # 9 views: the register rank selection for the median
    check_against_reference(warp_aggregate_fused, tokens, shifts, reduce, upsample, ignore_padding, output, return_std)


@pytest.mark.parametrize("reduce,return_std,ignore_padding,output", [
    ("mean", False, False, "pixel"),  # the grouped mean kernel
    ("mean", False, True, "token"),
    ("mean", True, False, "token"),  # the per-pixel kernel
    ("median", True, True, "pixel"),
    ("median", False, False, "token"),
])
@pytest.mark.parametrize("views", [1, 2, 50])
@pytest.mark.parametrize("upsample", UPSAMPLES)
def test_fused_view_counts(upsample, views, reduce, return_std, ignore_padding, output):
    """K = 1, 2 (the lower middle of two) and 50 (the median's sorting path) on a small grid: the
    interpreter's tl.sort costs about 60 ms per sorted row."""
    tokens, shifts = make_case(views, batch=1, channels=1, h=2, w=3)
    check_against_reference(warp_aggregate_fused, tokens, shifts, reduce, upsample, ignore_padding, output, return_std)


def test_fused_median_of_128_views():
    tokens, shifts = make_case(128, batch=1, channels=1, h=1, w=2)
    check_against_reference(warp_aggregate_fused, tokens, shifts, "median", "nearest", True, "pixel", True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("reduce,return_std,output", [("mean", False, "pixel"), ("median", True, "token")])
def test_fused_other_dtypes(dtype, reduce, return_std, output):
    tokens, shifts = make_case(9, dtype=dtype)
    check_against_reference(warp_aggregate_fused, tokens, shifts, reduce, "bilinear", True, output, return_std)


def test_fused_patch_14_nearest_paper_settings():
    """The paper's setting (p = 14, 50 views of the d = 3 grid, nearest, zero fill) on a 2 x 3 grid."""
    tokens, _ = make_case(50, batch=1, channels=2, h=2, w=3)
    shifts = fastsrt.paper_grid(3)
    check_against_reference(warp_aggregate_fused, tokens, shifts, "mean", "nearest", False, "pixel", False, patch=14)


@requires_cuda
@pytest.mark.parametrize("return_std", [False, True])  # without std, the mean runs the grouped kernel
@pytest.mark.parametrize("reduce,upsample,ignore_padding,output", EVERY_MODE)
def test_fused_on_cuda(reduce, upsample, ignore_padding, output, return_std):
    for views, dtype in [(9, torch.float32), (50, torch.float32), (50, torch.bfloat16)]:
        tokens, shifts = make_case(views, dtype=dtype, batch=2, channels=40, h=11, w=13, device="cuda")
        check_against_reference(warp_aggregate_fused, tokens, shifts, reduce, upsample, ignore_padding, output,
                                return_std, patch=14)


@requires_cuda
@pytest.mark.parametrize("reduce", REDUCES)
def test_fused_peak_memory_on_cuda(reduce):
    """The bound in docs/benchmarks.md: the fused path needs at most 1.2 x (token grids + output), K = 50,
    C = 64, 224 x 224 (p = 14): nothing per view at pixel resolution."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    tokens, shifts = make_case(50, batch=1, channels=64, h=16, w=16, device="cuda")
    warp_aggregate_fused(tokens, shifts, 14, reduce=reduce)  # compiles, and caches the shift tables
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    result, _ = warp_aggregate_fused(tokens, shifts, 14, reduce=reduce)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    assert peak <= 1.2 * (tokens.nbytes + result.nbytes), (peak, tokens.nbytes, result.nbytes)


@requires_cuda
@pytest.mark.parametrize("reduce", REDUCES)  # the grouped-mean and the per-pixel kernel
def test_fused_offsets_beyond_int32_on_cuda(reduce):
    """2048 planes of 1036 x 1036 output pixels: 2.2e9 elements, past 2^31, so element offsets
    must be 64-bit. Planes at both ends are compared with the reference on those planes alone."""
    tokens = torch.randn(2, 1, 2048, 74, 74, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    shifts = [(0, 0), (3, -5)]
    result, _ = warp_aggregate_fused(tokens, shifts, 14, reduce=reduce)
    assert result.numel() > 2**31
    for plane in (0, 1, 2047):
        expected, _ = warp_aggregate_reference(tokens[:, :, plane : plane + 1], shifts, 14, reduce=reduce)
        assert_matches(result[:, plane : plane + 1], expected, exact_elements=reduce == "median")
    del result
    torch.cuda.empty_cache()


@pytest.mark.parametrize("reduce", REDUCES)  # the grouped-mean and the per-pixel kernel
def test_launch_grids_stay_within_cuda_limits(monkeypatch, reduce):
    """CUDA grids allow 2^31 - 1 programs on axis 0 but only 65535 on axes 1 and 2: 300,000
    planes (B*C) must not land on those. The launch is recorded, not run."""
    kernels = _triton.kernels(KERNELS)
    grids = []

    class Recorder:
        def __getitem__(self, grid):
            grids.append(grid)
            return lambda *args, **kwargs: None

    for name in ("grouped_mean_kernel", "per_pixel_kernel"):
        monkeypatch.setattr(kernels, name, Recorder())
    tokens = torch.randn(2, 1, 300_000, 1, 2, device=DEVICE)
    warp_aggregate_fused(tokens, [(0, 0), (1, 0)], 2, reduce=reduce)
    (grid,) = grids
    assert grid[0] < 2**31 and all(size <= 65535 for size in grid[1:]), grid


def test_kernels_compile_for_sm80_and_sm90_without_a_gpu():
    """Triton's own LLVM and ptxas compile the kernels for sm_80 and sm_90 without a GPU, with the
    tiles the launcher picks there (grouped mean; per-pixel median by rank selection and by sort;
    float32, bfloat16, float64), and spill no register: catches what the interpreter accepts and
    the compiler does not (scripts/check_triton_kernels.py, out of interpreter mode)."""
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("Triton's NVIDIA backend is not installed")
    checker = Path(__file__).resolve().parents[1] / "scripts" / "check_triton_kernels.py"
    done = subprocess.run([sys.executable, str(checker), "--ops", "warp_aggregate"], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "20 kernels compiled for sm_80, sm_90, no register spills" in done.stdout


# ---- chunked torch path -------------------------------------------------------------------


@pytest.mark.parametrize("return_std", [False, True])
@pytest.mark.parametrize("views", [1, 2, 9, 50])
@pytest.mark.parametrize("reduce,upsample,ignore_padding,output", EVERY_MODE)
def test_chunked_matches_reference(monkeypatch, reduce, upsample, ignore_padding, output, views, return_std):
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 600)  # many chunks of channels and rows, uneven last ones
    tokens, shifts = make_case(views)
    check_against_reference(warp_aggregate_chunked, tokens, shifts, reduce, upsample, ignore_padding, output,
                            return_std)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("reduce,return_std", [("mean", False), ("median", True)])
def test_chunked_other_dtypes_one_chunk(dtype, reduce, return_std):
    tokens, shifts = make_case(9, dtype=dtype)
    check_against_reference(warp_aggregate_chunked, tokens, shifts, reduce, "bilinear", True, "token", return_std)


class AllocationPeak(TorchDispatchMode):
    """The peak bytes of the tensor storages that ops under this mode allocate (each counted
    until its storage is freed), leaving out the storages of ``existing`` tensors (views of the
    inputs). Temporaries inside one op (e.g. a sort's buffers) are not seen."""

    def __init__(self, *existing: torch.Tensor):
        super().__init__()
        self.live = self.peak = 0
        self.counted = {t.untyped_storage().data_ptr() for t in existing}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()  # one Python object per storage, finalised when it is freed
                if storage.nbytes() and storage.data_ptr() not in self.counted:
                    self.counted.add(storage.data_ptr())
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._freed, storage.data_ptr(), storage.nbytes())
        return out

    def _freed(self, pointer: int, size: int) -> None:
        self.counted.discard(pointer)
        self.live -= size


@pytest.mark.parametrize("reduce,upsample,ignore_padding,output,return_std", [
    ("mean", "nearest", False, "pixel", False),  # the grouped mean
    ("median", "nearest", True, "token", True),  # the in-token offset classes
    ("median", "bilinear", False, "pixel", True),  # rows of K warped values
])
def test_chunked_peak_memory_is_a_few_chunks(monkeypatch, reduce, upsample, ignore_padding, output, return_std):
    """Beyond its outputs the chunked path holds a few chunks, never K x C x H x W: at K = 50 and
    4096-element chunks at most 8 chunks (measured: 0.5 to 5), where the reference holds ~370 to
    ~740 of them. A chunk is at least the K values of one token row of one plane."""
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 4096)
    tokens, shifts = make_case(50, batch=1, channels=32, device="cpu")
    views, _, channels, h, w = tokens.shape
    chunk_bytes = 4 * max(chunked.CHUNK_ELEMENTS, views * PATCH * w * PATCH)
    args = (tokens, shifts, PATCH, upsample, reduce, ignore_padding, output, return_std)
    peaks = {}
    for name, implementation in [("chunked", warp_aggregate_chunked), ("reference", warp_aggregate_reference)]:
        with AllocationPeak(tokens) as tracked:
            result, std = implementation(*args)
        outputs = result.nbytes + (std.nbytes if return_std else 0)
        peaks[name] = (tracked.peak - outputs) / chunk_bytes
    assert peaks["chunked"] <= 8 and peaks["reference"] >= 100, peaks


# ---- dispatch, fallbacks, bad input -------------------------------------------------------


def test_dispatch_reports_what_ran():
    tokens, shifts = make_case(9)
    expected, _ = warp_aggregate_reference(tokens, shifts, PATCH)
    auto = "fused" if DEVICE == "cuda" else "chunked"
    for impl, ran in [("auto", auto), ("reference", "reference"), ("fused", "fused"), ("chunked", "chunked")]:
        out = warp_aggregate(tokens, shifts, PATCH, impl=impl)
        assert out.impl == ran and out.std is None
        assert_matches(out.result, expected)


@pytest.mark.parametrize("reduce", REDUCES)
def test_dispatch_checks_once_and_reuses_the_shift_tables(monkeypatch, reduce):
    """One argument check per call; the kernels' int32 shift tables are made once per shifts and
    device, not copied to the device on every call."""
    checks = []
    for module in (reference, dispatch):  # the dispatcher's check and the public functions' checks
        monkeypatch.setattr(module, "check_warp_aggregate_args", lambda *args: checks.append(args))
    tokens, shifts = make_case(3, batch=1, channels=1, h=2, w=3)
    tables = fused._grouped_shift_tables if reduce == "mean" else fused._shift_tables
    tables.cache_clear()
    first = warp_aggregate(tokens, shifts, PATCH, reduce=reduce, impl="fused")
    second = warp_aggregate(tokens, list(shifts), PATCH, reduce=reduce, impl="fused")
    assert len(checks) == 2
    assert (tables.cache_info().misses, tables.cache_info().hits) == (1, 1)
    assert torch.equal(first.result, second.result)


def test_fused_without_interpreter_on_cpu_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(errors, "_warned", set())
    tokens, shifts = make_case(2, device="cpu")
    with pytest.warns(UserWarning, match="need CUDA tensors.*falls back to 'chunked'"):
        assert warp_aggregate(tokens, shifts, PATCH, impl="fused").impl == "chunked"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warp_aggregate(tokens, shifts, PATCH, impl="fused").impl == "chunked"


def test_fused_on_cpu_without_interpreter_returns_the_chunked_result(monkeypatch):
    """impl="fused" on CPU tensors outside the interpreter: one warning over two calls, and the
    chunked path's outputs, element for element."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(errors, "_warned", set())
    tokens, shifts = make_case(5, device="cpu")
    expected, expected_std = warp_aggregate_chunked(tokens, shifts, PATCH, "bilinear", "median", True, "pixel", True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [warp_aggregate(tokens, shifts, PATCH, "bilinear", "median", True, "pixel", True, impl="fused")
                for _ in range(2)]
    assert len(caught) == 1 and "TRITON_INTERPRET=1" in str(caught[0].message), [str(w.message) for w in caught]
    for out in outs:
        assert out.impl == "chunked"
        assert torch.equal(out.result, expected) and torch.equal(out.std, expected_std)


def test_unknown_impl_is_named():
    tokens, shifts = make_case(2, device="cpu")
    with pytest.raises(ValueError, match="impl='fastest'") as raised:
        warp_aggregate(tokens, shifts, PATCH, impl="fastest")
    assert all(repr(name) in str(raised.value) for name in IMPLS)


def test_impl_options_are_the_dispatchers_names():
    """fastsrt.options lists the values impl takes; the dispatcher knows exactly those."""
    assert names(dispatch.IMPLEMENTATIONS) == IMPLS


def test_importing_fastsrt_does_not_import_the_kernels():
    """The kernel module is imported by the first fused call, not by `import fastsrt` (nor by
    importing the op's package)."""
    script = textwrap.dedent(f"""
        import sys
        import torch
        import fastsrt
        import fastsrt.ops.warp_aggregate as wa
        print("after import:", {KERNELS!r} in sys.modules)
        wa.warp_aggregate(torch.randn(2, 1, 1, 2, 2), [(0, 0), (1, 0)], 2, impl="fused")
        print("after a fused call:", {KERNELS!r} in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "after import: False" in done.stdout
    if _triton.load() is not None:  # without Triton the fused call falls back and imports nothing
        assert "after a fused call: True" in done.stdout


def test_fused_kernels_refuse_cpu_tensors_outside_the_interpreter(monkeypatch):
    """Compiled Triton on CPU pointers would crash the process: a clear error instead."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    tokens, shifts = make_case(2, device="cpu")
    refusal = "fused Triton kernels cannot run on this cpu tensor.*TRITON_INTERPRET=1"
    with pytest.raises(errors.Unavailable, match=refusal):
        warp_aggregate_fused(tokens, shifts, PATCH)


def test_import_and_fallback_without_triton():
    """With triton unimportable, `import fastsrt` works and impl="fused" warns once, then runs chunked."""
    script = textwrap.dedent("""
        import sys, warnings
        sys.modules["triton"] = None  # import triton raises ImportError
        import torch, fastsrt
        from fastsrt.ops.warp_aggregate import warp_aggregate
        tokens = torch.randn(3, 1, 2, 4, 5)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runs = [warp_aggregate(tokens, [(0, 0), (1, -2), (0, 0)], 2, impl="fused").impl for _ in range(2)]
        print(runs, len(caught), caught[0].message)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "['chunked', 'chunked'] 1 Triton is not usable" in done.stdout


@pytest.mark.parametrize("change,error,match", [
    (dict(impl="fast"), ValueError, "impl='fast'"),
    (dict(reduce="max"), ValueError, "reduce='max'"),
    (dict(upsample="bicubic"), ValueError, "upsample='bicubic'"),
    (dict(output="image"), ValueError, "output='image'"),
    (dict(tokens=torch.randn(2, 3, 4, 5)), ValueError, r"\(K, B, C, h, w\)"),
    (dict(tokens=torch.ones(2, 1, 3, 4, 5, dtype=torch.int64)), TypeError, "torch.int64"),
    (dict(shifts=[(0, 0)]), ValueError, "1 shifts for 2 views"),
    (dict(patch_size=0), ValueError, "patch_size"),
])
def test_bad_input_is_named(change, error, match):
    args = dict(tokens=torch.randn(2, 1, 3, 4, 5), shifts=[(0, 0), (1, 1)], patch_size=2) | change
    with pytest.raises(error, match=match):
        warp_aggregate(**args)


# ---- SRT through the public API -----------------------------------------------------------


@pytest.mark.parametrize("settings,std", [
    (dict(), False),  # the paper's: nearest, zero fill, mean over all views
    (dict(reduce="median", upsample="bilinear", ignore_padding=True), True),
])
def test_srt_fused_equals_reference(settings, std):
    model = tiny_vit(embed_dim=24).to(DEVICE)  # patch 14
    images = torch.randn(1, 3, 28, 42, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    runs = {}
    for impl in ("reference", "fused", "auto"):
        srt = fastsrt.SRT(model, shifts=1, impl=impl, pretrained=False, **settings)
        runs[impl] = srt.run(images, std=std)
        assert runs[impl].aggregation_impl == {"auto": "fused" if DEVICE == "cuda" else "chunked"}.get(impl, impl)
    for impl in ("fused", "auto"):
        # fused views (the patch-embedding kernel) round differently from the model's conv, so
        # even a median is compared as a whole, not element by element
        assert_matches(runs[impl].features, runs["reference"].features)
        if std:
            assert_matches(runs[impl].std, runs["reference"].std)
