import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from utils import rel_err, requires_cuda, tiny_vit

import fastsrt
import fastsrt.dvt
from fastsrt import errors
from fastsrt.backbone import Backbone
from fastsrt.dvt import decomposition
from fastsrt.dvt.crops import render_views, sample_crops, token_coordinates
from fastsrt.dvt.decomposition import (
    DecomposeConfig,
    decomposition_loss,
    extract_view_features,
    fit_decomposition,
)
from fastsrt.errors import Unavailable
from fastsrt.io import normalize
from fastsrt.ops.grid_encoding import GridEncodingConfig

SMALL_ENCODING = GridEncodingConfig(levels=6, features=4, log2_table_size=12, base_resolution=4, max_resolution=64)
# the reduced setting of the recovery test: 64 x 64 views of patch 8 (8 x 8 tokens), 48 views
SMALL = dict(size=64, tokens_per_step=512, encoding=SMALL_ENCODING)


@pytest.fixture(autouse=True)
def one_thread():
    """These fits are thousands of tiny ops: on a busy 2-core machine OpenMP's barriers make two
    threads ~30x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class SyntheticViT:
    """A backbone-like callable: features = a smooth function of the image content under each
    token (tanh of a fixed colour mix) + a fixed pattern tied to the token's position in the
    view (zero mean over positions) + noise."""

    def __init__(self, channels=32, grid=8, patch=8, noise=0.05, amplitude=0.5, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.patch, self.noise = patch, noise
        self.mix = torch.randn(channels, 3, generator=generator) * 1.5
        self.bias = torch.randn(channels, generator=generator) * 0.3
        pattern = torch.randn(channels, grid, grid, generator=generator)
        self.pattern = amplitude * (pattern - pattern.mean((1, 2), keepdim=True))
        self.noise_generator = torch.Generator().manual_seed(seed + 1)

    def smooth(self, images):
        colours = F.avg_pool2d(images, self.patch)
        mix, bias = self.mix.to(images.device), self.bias.to(images.device)
        return torch.tanh(torch.einsum("ck,nkhw->nchw", mix, colours) + bias[:, None, None])

    def __call__(self, images):
        smooth = self.smooth(images)
        noise = self.noise * torch.randn(smooth.shape, generator=self.noise_generator)
        return smooth + (self.pattern + noise).to(images.device)


def smooth_image(size=96, seed=0):
    """A (3, size, size) image of low-frequency waves in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    channels = []
    for _ in range(3):
        freq = torch.rand(3, generator=generator) * 4 + 1
        phase = torch.rand(3, generator=generator) * 2 * math.pi
        wave = 0.2 * torch.sin(freq[0] * math.pi * x + phase[0]) * torch.cos(freq[1] * math.pi * y + phase[1])
        channels.append(0.5 + wave + 0.2 * torch.sin(freq[2] * 2 * (x + y) + phase[2]))
    return torch.stack(channels).clamp(0, 1)


def smooth_truth(net, image, size=64):
    square = F.interpolate(image[None], size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    square = square.clamp(0, 1)
    return net.smooth(normalize(square[0])[None])[0]


def centred_cosine(a, b):
    a, b = a - a.mean((1, 2), keepdim=True), b - b.mean((1, 2), keepdim=True)
    return F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def test_synthetic_recovery_of_artifact_and_clean_features():
    """Two images fitted together: each recovers the planted artifact and its smooth part."""
    net = SyntheticViT()
    images = [smooth_image(seed=0), smooth_image(seed=1)]
    results = fastsrt.dvt.decompose(images, net, views=48, iterations=600, seed=0, patch_size=8, **SMALL)
    for image, result in zip(images, results):
        assert result.artifact.shape == result.clean.shape == result.raw.shape == result.residual.shape == (32, 8, 8)
        assert centred_cosine(result.artifact, net.pattern) >= 0.95  # ~0.98 here
        truth = smooth_truth(net, image)
        clean_error, raw_error = rel_err(result.clean, truth), rel_err(result.raw, truth)
        assert clean_error < 0.4 * raw_error, (clean_error, raw_error)  # ~0.2 vs ~0.68 here
        assert result.losses[-50:].mean() < 0.5 * result.losses[:50].mean()
        assert result.encoding in ("extension", "reference")


def test_an_image_fits_the_same_alone_or_in_any_group():
    net = SyntheticViT(noise=0.0)
    first, second, other = smooth_image(seed=0), smooth_image(seed=1), smooth_image(seed=2)
    settings = dict(views=6, iterations=70, patch_size=8, **SMALL)  # 70 steps: more than one block of token draws
    a = fastsrt.dvt.decompose([first, second], net, seed=3, **settings)[0]
    b = fastsrt.dvt.decompose([first, other], net, seed=3, **settings)[0]
    for name in ("clean", "artifact", "residual", "losses"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    # its own seed decides its crops, initialisation and token samples, not its place in the group
    alone = fastsrt.dvt.decompose(second, net, seed=7, **settings)
    grouped = fastsrt.dvt.decompose([other, first, second], net, seed=[1, 2, 7], **settings)
    for name in ("raw", "clean", "artifact", "residual", "losses"):
        assert rel_err(getattr(grouped[2], name), getattr(alone, name)) <= 1e-6, name
    assert not torch.equal(grouped[2].losses, fastsrt.dvt.decompose(second, net, seed=1, **settings).losses)
    with pytest.raises(ValueError, match="one int per image"):
        fastsrt.dvt.decompose([first, second], net, seed=[1], **settings)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_extension_and_reference_fit_the_same(extension, device):
    if device == "cuda" and not extension.has_cuda():
        pytest.skip("the extension was built without CUDA kernels (no nvcc or GPU at build time)")
    net = SyntheticViT(noise=0.0)
    settings = dict(views=8, iterations=60, seed=0, patch_size=8, device=device, **SMALL)
    fast = fastsrt.dvt.decompose(smooth_image(), net, impl="extension", **settings)
    reference = fastsrt.dvt.decompose(smooth_image(), net, impl="reference", **settings)
    assert fast.encoding == "extension" and reference.encoding == "reference"
    assert rel_err(fast.losses, reference.losses) < 1e-4
    assert rel_err(fast.clean, reference.clean) < 1e-3


def test_the_encoding_is_chosen_once_per_fit_and_recorded(monkeypatch):
    chosen = []

    def counting_choice(*args, **kwargs):
        chosen.append(decomposition_choose(*args, **kwargs))
        return chosen[-1]

    decomposition_choose = decomposition.choose_encoding
    monkeypatch.setattr(decomposition, "choose_encoding", counting_choice)
    settings = dict(views=2, iterations=4, size=32, tokens_per_step=16, patch_size=8, encoding=SMALL_ENCODING)
    results = fastsrt.dvt.decompose([smooth_image(32), smooth_image(32, seed=1)], SyntheticViT(grid=4), **settings)
    assert len(chosen) == 1 and [r.encoding for r in results] == [chosen[0].name] * 2

    monkeypatch.setenv("FASTSRT_NO_EXTENSION", "1")
    monkeypatch.setattr(errors, "_warned", set())  # the fallback's one warning, as in a new process
    with pytest.warns(UserWarning, match="FASTSRT_NO_EXTENSION"):
        assert fastsrt.dvt.decompose(smooth_image(32), SyntheticViT(grid=4), **settings).encoding == "reference"
    with pytest.raises(Unavailable, match="FASTSRT_NO_EXTENSION"):
        fastsrt.dvt.decompose(smooth_image(32), SyntheticViT(grid=4), impl="extension", **settings)
    with pytest.raises(ValueError, match="impl"):  # before the views are rendered and run
        fastsrt.dvt.decompose(smooth_image(32), None, impl="fast", **settings)


def test_phases_fit_f_and_g_then_f_and_h(monkeypatch):
    """Phase 1 (first half): F and G learn, h is untouched; phase 2: G is frozen, F and h learn."""
    snapshots, created = [], []

    def parameters():
        return {name: p.detach().clone() for name, p in created[0].named_parameters()}

    class RecordingFields(decomposition.Fields):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            created.append(self)
            snapshots.append(parameters())  # the initialisation

    adam_step = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        result = adam_step(self, *args, **kwargs)
        snapshots.append(parameters())
        return result

    monkeypatch.setattr(decomposition, "Fields", RecordingFields)
    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    fastsrt.dvt.decompose(smooth_image(32), SyntheticViT(grid=4), views=3, iterations=6, size=32, tokens_per_step=32,
                          patch_size=8, encoding=SMALL_ENCODING)
    assert len(snapshots) == 7

    def changed(step, prefix):  # did the step change any parameter named prefix*?
        before, after = snapshots[step], snapshots[step + 1]
        return any(not torch.equal(before[name], after[name]) for name in before if name.startswith(prefix))

    for step in range(6):
        phase_two = step >= 3
        assert changed(step, "table") and changed(step, "field."), step  # F: both phases
        assert changed(step, "artifact") != phase_two, step  # G: phase 1 only
        assert changed(step, "residual.") == phase_two, step  # h: phase 2 only


def test_decompose_is_the_function():
    import fastsrt.dvt.decomposition  # noqa: F401  (the submodule no longer shadows the function)

    assert inspect.isfunction(fastsrt.dvt.decompose) and fastsrt.dvt.decompose is decomposition.decompose


def test_decompose_with_a_timm_vit_an_image_file_and_a_backbone(tmp_path):
    from PIL import Image

    path = tmp_path / "photo.png"
    Image.fromarray((smooth_image(40).permute(1, 2, 0).numpy() * 255).astype("uint8")).save(path)
    vit = tiny_vit()
    settings = dict(views=3, iterations=4, size=56, tokens_per_step=16, encoding=SMALL_ENCODING)
    from_file = fastsrt.dvt.decompose(path, vit, **settings)
    from_backbone = fastsrt.dvt.decompose(str(path), Backbone(vit), **settings)
    assert from_file.clean.shape == (48, 4, 4) and from_file.losses.shape == (4,)
    assert torch.equal(from_file.raw, from_backbone.raw) and torch.isfinite(from_file.clean).all()


def test_loss_matches_its_definition():
    generator = torch.Generator().manual_seed(0)
    clean, artifact, raw, residual = (torch.randn(2, 5, 8, generator=generator, dtype=torch.float64) for _ in range(4))
    residual.requires_grad_()
    loss = decomposition_loss(clean, artifact, raw, residual)
    for b in range(2):
        pred = clean[b] + artifact[b] + residual[b].detach()
        cosine = sum(torch.dot(pred[n], raw[b, n]) / (pred[n].norm() * raw[b, n].norm()) for n in range(5)) / 5
        expected = ((pred - raw[b]) ** 2).mean() + 1 - cosine
        expected += 0.1 * ((residual[b] - (raw[b] - clean[b] - artifact[b])) ** 2).mean()
        expected += 0.02 * residual[b].abs().mean()
        assert abs(loss[b].item() - expected.item()) < 1e-12
    # the distance term sees h only through a stop-gradient: h learns from its own two terms alone
    loss.sum().backward()
    own = 0.1 * ((residual - (raw - clean - artifact)) ** 2).mean((1, 2)) + 0.02 * residual.abs().mean((1, 2))
    (expected_grad,) = torch.autograd.grad(own.sum(), residual)
    assert torch.allclose(residual.grad, expected_grad)
    phase_one = decomposition_loss(clean, artifact, raw)
    pred = clean + artifact
    expected = ((pred - raw) ** 2).mean((1, 2)) + 1 - F.cosine_similarity(pred, raw, dim=-1).mean(1)
    assert torch.allclose(phase_one, expected)


def test_learning_rate_schedule():
    config = DecomposeConfig(iterations=1000, warmup=0.1)
    rates = [config.learning_rate(step) for step in range(1000)]
    assert rates[0] == pytest.approx(1e-4) and rates[99] == pytest.approx(1e-2)
    assert max(rates) == pytest.approx(1e-2) and rates[-1] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[100:], rates[101:]))


def test_crops_follow_random_resized_crop():
    crops = sample_crops(400, 100, generator=torch.Generator().manual_seed(0))
    boxes = crops.boxes.double()
    assert crops.boxes[0].tolist() == [0, 0, 100, 100] and not crops.flips[0]
    top, left, height, width = boxes[1:].unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + height <= 100).all() and (left + width <= 100).all()
    area = height * width / 100**2
    assert area.min() > 0.09 and area.max() < 0.52  # scale (0.1, 0.5), up to rounding
    assert (width / height).min() > 0.7 and (width / height).max() < 1.4
    assert 0.4 < crops.flips[1:].float().mean() < 0.6
    again = sample_crops(400, 100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(crops.boxes, again.boxes) and torch.equal(crops.flips, again.flips)


def test_views_and_token_coordinates():
    crops = sample_crops(3, 32, generator=torch.Generator().manual_seed(1))
    crops.boxes[1] = torch.tensor([8, 4, 16, 24])
    crops.boxes[2] = crops.boxes[1]
    crops.flips[1:] = torch.tensor([False, True])
    image = torch.rand(3, 32, 32)
    views = render_views(image, crops, range(3))
    assert torch.equal(views[0], image)
    expected = F.interpolate(image[None, :, 8:24, 4:28], size=(32, 32), mode="bilinear", align_corners=False,
                             antialias=True)[0]
    assert torch.allclose(views[1], expected) and torch.equal(views[2], views[1].flip(-1))
    coords = token_coordinates(crops, 4)
    assert torch.allclose(coords[0, 0, :, 0], torch.linspace(0, 1, 4))
    assert torch.allclose(coords[0, :, 0, 1], torch.linspace(0, 1, 4))
    assert torch.allclose(coords[1, 0, :, 0], torch.linspace(4 / 32, 28 / 32, 4))
    assert torch.allclose(coords[1, :, 0, 1], torch.linspace(8 / 32, 24 / 32, 4))
    assert torch.equal(coords[2, :, :, 0], coords[1, :, :, 0].flip(-1))
    assert torch.equal(coords[2, ..., 1], coords[1, ..., 1])


def test_float16_cache_switches_to_float32_on_overflow():
    huge = fastsrt.CallableBackbone(lambda images: 1e5 * F.avg_pool2d(images, 8).repeat(1, 4, 1, 1), patch_size=8)
    with pytest.warns(UserWarning, match="overflow float16"):
        features = extract_view_features([smooth_image(32)], huge, DecomposeConfig(views=3, size=32, view_batch=2))
    assert features.cache.dtype == torch.float32 and torch.isfinite(features.cache).all()
    fine = fastsrt.CallableBackbone(lambda images: F.avg_pool2d(images, 8).repeat(1, 4, 1, 1), patch_size=8)
    features = extract_view_features([smooth_image(32)], fine, DecomposeConfig(views=3, size=32))
    assert features.cache.dtype == torch.float16 and features.cache.shape == (1, 3 * 16, 12)
    assert torch.allclose(features.cache[0, :16].float(), features.raw[0].flatten(1).T, atol=1e-3)
    results = fit_decomposition(features, DecomposeConfig(views=3, size=32, iterations=2, encoding=SMALL_ENCODING))
    assert results[0].clean.shape == (12, 4, 4)


def test_backbone_under_bfloat16_autocast():
    vit = Backbone(tiny_vit())
    config = DecomposeConfig(views=3, size=28, cache_dtype="float32")
    exact = extract_view_features([smooth_image(28)], vit, config)
    fast = extract_view_features([smooth_image(28)], vit, DecomposeConfig(views=3, size=28, cache_dtype="float32",
                                                                          backbone_dtype="bfloat16"))
    assert fast.raw.dtype == fast.cache.dtype == torch.float32
    assert 0 < rel_err(fast.cache, exact.cache) < 3e-2 and torch.equal(fast.coords, exact.coords)


@pytest.mark.parametrize("image, settings, error", [
    (torch.rand(1, 3, 32, 32), {}, "image must be"),
    (torch.rand(3, 32, 32) * 4 - 2, {}, r"in \[0, 1\]"),
    (torch.full((3, 32, 32), float("nan")), {}, "NaN"),
    ("/no/such/image.png", {}, "cannot read image"),
    (torch.rand(3, 32, 32), {"size": 30}, "multiple of the patch"),
    (torch.rand(3, 32, 32), {"iterations": 1}, "iterations"),
    (torch.rand(3, 32, 32), {"crop_scale": (0.5, 0.1)}, "crop_scale"),
    (torch.rand(3, 32, 32), {"cache_dtype": "int8"}, "cache_dtype"),
    (torch.rand(3, 32, 32), {"layer": [0, 1]}, "layer"),
])
def test_decompose_rejects_bad_input(image, settings, error):
    net = SyntheticViT(grid=4)
    settings = {"views": 2, "iterations": 2, "size": 32, **settings}
    with pytest.raises(ValueError, match=error):
        fastsrt.dvt.decompose(image, net, patch_size=8, **settings)


def test_decompose_rejects_unknown_settings_and_models():
    with pytest.raises(TypeError, match="colour"):
        fastsrt.dvt.decompose(torch.rand(3, 32, 32), SyntheticViT(grid=4), patch_size=8, colour="red")
    with pytest.raises(ValueError, match="patch_size"):
        fastsrt.dvt.decompose(torch.rand(3, 32, 32), SyntheticViT(grid=4))
