"""DVT stage 1, random weights: the grid encoding, the feature extraction and the fit.

    encoding   one forward + backward of the paper's encoding on (1, N, 2) random points: the
               torch reference beside the C++/CUDA extension (skipped where it cannot run);
               the extension's output and gradients are checked against the reference's
    features   the views (full image + random crops) through the backbone, tokens cached, all
               images: float32 (the authors' precision), and on a GPU bfloat16 autocast, whose
               tokens are checked against the float32 ones
    fit        the torch reference path (torch encoding, float32 token cache, one image per fit,
               the authors' way) beside fastsrt's (the extension, float16 cache), one image per fit
               and all images in one fit; image 0's final loss (mean over the last 5% of the
               steps) is checked to be within LOSS_TOLERANCE of the reference path's
Seconds per image = a row's time / its images. Each fit row is one timed call after a 10-step
warm-up fit; the features rows are one timed call each.
"""
import dataclasses
from dataclasses import dataclass

import pytest
import torch

import fastsrt
from bench import harness
from bench.harness import DEVICE
from fastsrt.dvt.decomposition import DecomposeConfig, ViewFeatures, extract_view_features, fit_decomposition
from fastsrt.errors import Unavailable
from fastsrt.ops.grid_encoding import GridEncodingConfig, grid_encode  # the one import of the grid encoding

# CPU: ViT-S at 112 px (8 x 8 tokens), 9 views, 100 steps of 512 tokens, a 2^14-row table up to
# resolution 128; the encoding rows take the paper's encoding in both settings
CPU_SETTING = dict(model="vit_small_patch14_dinov2", size=112, views=9, iterations=100, tokens_per_step=512, images=2,
                   encoding=GridEncodingConfig(log2_table_size=14, max_resolution=128), points=(4096, 65536),
                   backbone_dtypes=("float32",))
PAPER_SETTING = dict(model="vit_base_patch14_dinov2", size=518, views=769, iterations=20000, tokens_per_step=2048,
                     images=8, encoding=GridEncodingConfig(), points=(16384, 1048576),
                     backbone_dtypes=("float32", "bfloat16"))
LOSS_TOLERANCE = 0.02  # the fast path's final loss within 2% of the reference path's (docs/benchmarks.md)
ENCODING_TOLERANCE = 1e-5  # relative, output and gradients (tests/test_dvt_encoding.py)
FEATURE_TOLERANCE = 3e-2  # relative, bfloat16 autocast tokens vs float32 (tests/test_dvt_decompose.py)


@dataclass(frozen=True)
class Case:
    stage: str  # "encoding", "features" or "fit"
    impl: str  # encoding/fit: "reference" or "extension"; features: the backbone dtype
    points: int = 0  # encoding
    batch: int = 1  # fit: images per fit

    @property
    def id(self) -> str:
        if self.stage == "encoding":
            return f"encoding-N{self.points}-{self.impl}"
        if self.stage == "features":
            return f"features-{self.impl}"
        return f"fit-{self.batch}-per-fit-{self.impl}"

    @property
    def group(self) -> str:
        return f"dvt encoding N={self.points}" if self.stage == "encoding" else f"dvt {self.stage}"


def setting_of(config) -> dict:
    return PAPER_SETTING if config.getoption("target_shapes") else CPU_SETTING


def pytest_generate_tests(metafunc):
    setting = setting_of(metafunc.config)
    cases = [Case("encoding", impl, points=points)
             for points in setting["points"] for impl in ("reference", "extension")]
    cases += [Case("features", dtype) for dtype in setting["backbone_dtypes"]]
    cases += [Case("fit", "reference"), Case("fit", "extension"), Case("fit", "extension", batch=setting["images"])]
    metafunc.parametrize("case", harness.params(cases, gpu_only=lambda case: case.impl == "bfloat16"))


@pytest.fixture(scope="module")
def setting(request) -> dict:
    return setting_of(request.config)


def fit_config(setting: dict) -> DecomposeConfig:
    return DecomposeConfig(views=setting["views"], iterations=setting["iterations"], size=setting["size"],
                           tokens_per_step=setting["tokens_per_step"], encoding=setting["encoding"],
                           cache_dtype="float32")


@pytest.fixture(scope="module")
def backbone(setting) -> fastsrt.Backbone:
    torch.manual_seed(0)
    return fastsrt.Backbone(setting["model"], pretrained=False).eval().to(DEVICE)


@pytest.fixture(scope="module")
def images(setting) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.rand(3, setting["size"], setting["size"], generator=generator) for _ in range(setting["images"])]


_state: dict = {}  # float32 features (made once) and the reference fit's final loss, shared by the rows


def float32_features(setting, backbone, images) -> ViewFeatures:
    if "features" not in _state:
        _state["features"] = extract_view_features(images, backbone, fit_config(setting), device=DEVICE)
    return _state["features"]


def first_images(features: ViewFeatures, count: int, dtype: torch.dtype) -> ViewFeatures:
    return ViewFeatures(cache=features.cache[:count].to(dtype), coords=features.coords[:count],
                        raw=features.raw[:count], seconds=features.seconds)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def test_dvt_fit(benchmark, case, setting, backbone, images):
    benchmark.group = case.group
    if case.stage == "encoding":
        encoding_row(benchmark, case)
    elif case.stage == "features":
        features_row(benchmark, case, setting, backbone, images)
    else:
        fit_row(benchmark, case, setting, backbone, images)


def describe(encoding: GridEncodingConfig) -> str:
    return (f"{encoding.levels} levels x {encoding.features} features, 2^{encoding.log2_table_size} rows, "
            f"resolution {encoding.base_resolution}-{encoding.max_resolution}")


def shape_of(setting: dict) -> dict:
    return dict(model=setting["model"], size=setting["size"], views=setting["views"], iterations=setting["iterations"],
                tokens_per_step=setting["tokens_per_step"], encoding=describe(setting["encoding"]))


def encoding_row(benchmark, case: Case) -> None:
    config = GridEncodingConfig()  # the paper's
    generator = torch.Generator().manual_seed(0)
    coords = torch.rand(1, case.points, 2, generator=generator).to(DEVICE).requires_grad_()
    table = config.init_table(1, generator).to(DEVICE).requires_grad_()
    grad = torch.randn(1, case.points, config.output_dim, generator=generator).to(DEVICE)

    def forward_backward(impl: str):
        coords.grad = table.grad = None
        output = grid_encode(coords, table, config, impl=impl)
        output.backward(grad)
        return output.detach(), coords.grad, table.grad

    if case.impl == "extension":
        try:
            forward_backward("extension")  # builds the extension on first use, outside the timing
        except Unavailable as error:
            pytest.skip(str(error))
    results = harness.measure(benchmark, lambda: lambda: forward_backward(case.impl), impl=case.impl, ran=case.impl,
                              baseline=case.impl == "reference", dtype="float32",
                              shape=dict(points=case.points, encoding=describe(config)))
    if case.impl == "extension":
        for actual, expected in zip(results, forward_backward("reference")):
            assert relative_error(actual, expected) <= ENCODING_TOLERANCE


def features_row(benchmark, case: Case, setting: dict, backbone, images) -> None:
    config = dataclasses.replace(fit_config(setting), backbone_dtype=case.impl)
    extract_view_features(images[:1], backbone, dataclasses.replace(config, views=2), device=DEVICE)  # warm-up
    extract = lambda: extract_view_features(images, backbone, config, device=DEVICE)
    features = harness.measure(benchmark, lambda: extract, warmup=False, impl="backbone", dtype=case.impl,
                               baseline=case.impl == "float32", ran=f"backbone {case.impl}", images=len(images),
                               shape=shape_of(setting))
    if case.impl == "float32":
        _state["features"] = features
        return
    error = relative_error(features.cache, float32_features(setting, backbone, images).cache)
    benchmark.extra_info["rel_err_vs_float32"] = float(f"{error:.2e}")
    assert error <= FEATURE_TOLERANCE, error


def fit_row(benchmark, case: Case, setting: dict, backbone, images) -> None:
    config = fit_config(setting)
    features = float32_features(setting, backbone, images)
    cache_dtype = torch.float32 if case.impl == "reference" else torch.float16
    part = first_images(features, case.batch, cache_dtype)
    try:  # warm-up, outside the timing (also builds the extension on first use)
        fit_decomposition(first_images(part, 1, cache_dtype), dataclasses.replace(config, iterations=10),
                          impl=case.impl)
    except Unavailable as error:
        pytest.skip(str(error))
    results = harness.measure(benchmark, lambda: lambda: fit_decomposition(part, config, impl=case.impl), warmup=False,
                              impl=case.impl, variant=f"{case.batch} per fit", baseline=case.impl == "reference",
                              dtype="float32", images=case.batch,
                              cache_dtype=str(cache_dtype).removeprefix("torch."), shape=shape_of(setting))
    loss = results[0].final_loss
    benchmark.extra_info.update(ran=results[0].encoding, final_loss_image0=loss,
                                final_loss=sum(r.final_loss for r in results) / len(results))
    if case.impl == "reference":
        _state["reference_loss"] = loss
        return
    if "reference_loss" not in _state:
        reference = fit_decomposition(first_images(features, 1, torch.float32), config, impl="reference")
        _state["reference_loss"] = reference[0].final_loss
    gap = loss / _state["reference_loss"] - 1
    benchmark.extra_info["loss_vs_reference"] = round(gap, 5)
    assert abs(gap) <= LOSS_TOLERANCE, f"image 0's final loss is {100 * gap:+.2f}% off the reference path's"
